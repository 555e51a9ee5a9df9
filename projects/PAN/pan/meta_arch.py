"""PAN meta-architecture: staged ResNet -> (non-local blocks) -> PANHead, with PAN's losses
(Eq. 5): cross-entropy on every part, batch-hard triplet on the concatenated embeddings and
lambda_2 L_orth on the PLM masks."""

from fastreid.modeling.backbones import build_backbone
from fastreid.modeling.heads import build_heads
from fastreid.modeling.losses import cross_entropy_loss, triplet_loss
from fastreid.modeling.losses.cross_entroy_loss import log_accuracy

from reidzoo.modeling import ReidMetaArch
from reidzoo.modeling.backbone import STAGES
from reidzoo.registry import META_ARCH_REGISTRY

from .modules import orthogonal_loss


@META_ARCH_REGISTRY.register()
class PAN(ReidMetaArch):
    """Part-aware attention network, ``MODEL.META_ARCHITECTURE: PAN`` (Xiang et al., ACCV 2020).

    The backbone (``MODEL.BACKBONE``; must provide ``stem``/``run_stage`` as reidzoo's
    ``build_staged_resnet_backbone`` does, when connected (PAM, conv, identity) or non-local
    stages are configured) gives X^1..X^4; the head (``MODEL.HEADS.NAME``, normally
    ``PANHead``) holds PLM, PAM or the conv connections, the non-local blocks, embeddings,
    BNNecks and classifiers, so all of them are under ``self.heads``.

    Args:
        cfg (CfgNode)
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.backbone = build_backbone(cfg)
        self.heads = build_heads(cfg)
        self.orth_weight = float(cfg.MODEL.PAN.ORTH_WEIGHT)
        self.orth_normalize = cfg.MODEL.PAN.ORTH_MASKS == "normalized"
        connected = tuple(getattr(self.heads, "connected_stages", ()))  # PAM / conv / identity
        nl = tuple(getattr(self.heads, "nl", {}).keys())
        wanted = set(connected) | set(nl)
        self.stages = STAGES[: max((STAGES.index(s) for s in wanted), default=-1) + 1]
        self.staged = bool(wanted)
        if self.staged and not hasattr(self.backbone, "run_stage"):
            raise ValueError(
                f"MODEL.BACKBONE.NAME={cfg.MODEL.BACKBONE.NAME!r} has no run_stage(); PAM / "
                "conv / identity connections and non-local stages need "
                "build_staged_resnet_backbone (or a StagedResNet)"
            )

    def extract(self, images):
        """Backbone stage outputs, with the head's non-local blocks after their stages.

        Args:
            images (Tensor): [N, 3, H, W] normalised.
        Returns:
            dict[str, Tensor] | Tensor: stage outputs (incl. "layer4"), or the layer4 map when
            neither PAM nor non-local stages are configured.
        """
        if not self.staged:
            return self.backbone(images)
        nl = self.heads.nl
        out = {}
        x = self.backbone.stem(images)
        for s in STAGES:
            x = self.backbone.run_stage(s, x)
            if s in nl:
                x = nl[s](x)
            out[s] = x
        return out

    def forward(self, batched_inputs):
        """Args:
            batched_inputs (dict | Tensor): fast-reid batch ("images" float 0-255
                [N, 3, H, W], "targets" [N] in training) or images alone.
        Returns:
            dict[str, Tensor] of named losses in training; [N, K*EMBED_DIM] features (1536 for
            6 parts) in evaluation.
        """
        images = self.preprocess_image(batched_inputs)
        feats = self.extract(images)
        if not self.training:
            return self.heads(feats)
        if not isinstance(batched_inputs, dict) or "targets" not in batched_inputs:
            raise ValueError("PAN training needs a batch dict with 'targets'")
        targets = batched_inputs["targets"].to(self.device)
        return self.losses(self.heads(feats, targets), targets)

    def losses(self, outputs, targets):
        """PAN's loss terms (Eq. 5).

        Args:
            outputs (dict): PANHead training outputs.
            targets (Tensor): [N] labels.
        Returns:
            dict[str, Tensor]: ``loss_cls_p{k}`` per part (sum = L_xent), ``loss_triplet``
            (lambda_1 = TRI.SCALE), ``loss_orth`` (lambda_2 L_orth, PLM only, weight > 0).
        """
        logits = outputs["part_logits"]
        log_accuracy(logits[0].detach(), targets)
        out = {}
        if "CrossEntropyLoss" in self.loss_names:
            eps, alpha, scale = self.ce
            for k, lg in enumerate(logits):
                out[f"loss_cls_p{k}"] = cross_entropy_loss(lg.float(), targets, eps, alpha) * scale
        if "TripletLoss" in self.loss_names:
            margin, norm_feat, hard, scale = self.tri
            out["loss_triplet"] = (
                triplet_loss(outputs["triplet_features"].float(), targets, margin, norm_feat, hard)
                * scale
            )
        if outputs["masks"] and self.orth_weight > 0:
            out["loss_orth"] = self.orth_weight * orthogonal_loss(
                outputs["masks"], self.orth_normalize
            )
        return out
