"""The PFE meta-architecture (§IV-A, Fig. 3; docs/decisions/pfe.md#architecture).

Main branch: a staged ResNet (last stride 1) with TSAM after the stage outputs (inserted by
``MODEL.BACKBONE.INSERTS: ["layerK:PFETSAM"]``), F_5 = GAP(X_5) -> BN -> FC, trained with
CE + batch-hard triplet (Eq. 6) in stage I. Side branches (stage II): :class:`MFA` on
X_2, X_3, X_4 (layer1-3) and the top map X_5 (layer4), each F_s (512-d) -> BN -> its own
classifier, trained with the cascade loss (Eq. 7) and the region-overlap loss (Eq. 8) while
the main branch is frozen, BatchNorm statistics included.
"""

import logging

import torch
from fastreid.modeling.backbones import build_backbone
from fastreid.modeling.losses import cross_entropy_loss, triplet_loss
from torch import nn

from reidzoo.checkpoint import CheckpointMismatchError
from reidzoo.modeling import STAGES, ReidMetaArch
from reidzoo.registry import META_ARCH_REGISTRY

from .evaluation import FeatureGroupsEvaluator
from .losses import (
    RO_REDUCTIONS,
    SIDE_LOSSES,
    cascade_loss,
    independent_loss,
    region_overlap_loss,
    uniform_loss,
)
from .modules import MFA

logger = logging.getLogger(__name__)

#: state-dict prefixes of the main branch that stage II's features depend on (F_5's classifier,
#: ``heads.main_fc``, is unused while the main branch is frozen).
MAIN_PREFIXES = ("backbone.", "heads.main_neck.")


def _some(keys, limit=4):
    """``keys`` for a message: the first ``limit``, then how many there are."""
    keys = list(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def bnneck(dim):
    """BN before a classifier (§V-B), fast-reid's BNNeck style: weight 1, bias 0 and frozen.

    Returns:
        nn.BatchNorm1d
    """
    bn = nn.BatchNorm1d(dim)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    bn.bias.requires_grad_(False)
    return bn


def classifier(in_dim, num_classes):
    """Bias-free linear classifier, N(0, 0.001) init (fast-reid's ``Linear`` head)."""
    fc = nn.Linear(in_dim, num_classes, bias=False)
    nn.init.normal_(fc.weight, std=0.001)
    return fc


class PFEHeads(nn.Module):
    """Every layer of PFE after the backbone (under ``heads`` for fast-reid's LR factor).

    Args:
        top_dim (int): channels of X_5 (2048 for ResNet-50).
        in_channels (list[int]): channels of X_2..X_5 (side branches' inputs).
        num_classes (int): identities; <= 0 builds no classifier (inference / counting).
        cfg_pfe (CfgNode): ``MODEL.PFE``.
    """

    def __init__(self, top_dim, in_channels, num_classes, cfg_pfe):
        super().__init__()
        p = cfg_pfe
        self.main_neck = bnneck(top_dim)
        self.main_fc = classifier(top_dim, num_classes) if num_classes > 0 else None
        self.stage = int(p.STAGE)
        self.mfa = self.side_necks = self.side_fcs = None
        if self.stage == 2:
            dim = int(p.SIDE_DIM)
            self.mfa = MFA(in_channels, int(p.SIDE_CHANNELS), dim, float(p.ALPHA),
                           str(p.PROPAGATION), bool(p.SIDE_SEPARABLE))  # fmt: skip
            sides = len(in_channels) - 1
            self.side_necks = nn.ModuleList(bnneck(dim) for _ in range(sides))
            if num_classes > 0:
                if p.SIDE_LOSS == "cascade":  # FC_s on [F_s, ..., F_S]
                    dims = [dim * (sides - i) + top_dim for i in range(sides)]
                elif p.SIDE_LOSS == "independent":
                    dims = [dim] * sides
                else:  # uniform: one classifier on [F_2, ..., F_S]
                    dims = [dim * sides + top_dim]
                self.side_fcs = nn.ModuleList(classifier(d, num_classes) for d in dims)

    def main_modules(self):
        """list[nn.Module]: the main branch's head (F_5's BN and classifier)."""
        return [m for m in (self.main_neck, self.main_fc) if m is not None]


@META_ARCH_REGISTRY.register()
class PFE(ReidMetaArch):
    """Progressive feature enhancement; ``MODEL.META_ARCHITECTURE: PFE``.

    Args:
        cfg (CfgNode): uses ``MODEL.PFE``, ``MODEL.BACKBONE`` (a backbone with
            ``forward_stages``, e.g. ``build_staged_resnet_backbone``; TSAM via ``INSERTS``),
            ``MODEL.HEADS.NUM_CLASSES``, ``MODEL.LOSSES`` (CE EPSILON/ALPHA/SCALE, TRI
            MARGIN/NORM_FEAT/HARD_MINING/SCALE), ``MODEL.PIXEL_MEAN/STD``.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        p = cfg.MODEL.PFE
        self.stage = int(p.STAGE)
        if self.stage not in (1, 2):
            raise ValueError(f"MODEL.PFE.STAGE={p.STAGE}; expected 1 or 2")
        if p.SIDE_LOSS not in SIDE_LOSSES:
            raise ValueError(f"MODEL.PFE.SIDE_LOSS={p.SIDE_LOSS!r}; expected one of {SIDE_LOSSES}")
        if p.TEST_FEAT not in ("after", "before"):
            raise ValueError(f"MODEL.PFE.TEST_FEAT={p.TEST_FEAT!r}; expected 'after' or 'before'")
        if p.RO_REDUCTION not in RO_REDUCTIONS:
            raise ValueError(
                f"MODEL.PFE.RO_REDUCTION={p.RO_REDUCTION!r}; expected one of {RO_REDUCTIONS}"
            )
        self.ro_reduction = str(p.RO_REDUCTION)
        self.side_loss = str(p.SIDE_LOSS)
        self.temperatures = [float(t) for t in p.TEMPERATURES]
        self.ro_weight = float(p.RO_WEIGHT)
        self.test_after_bn = p.TEST_FEAT == "after"

        self.backbone = build_backbone(cfg)
        if not hasattr(self.backbone, "forward_stages"):
            raise ValueError(
                f"MODEL.BACKBONE.NAME={cfg.MODEL.BACKBONE.NAME!r} has no forward_stages; PFE "
                "needs stage outputs (use build_staged_resnet_backbone)"
            )
        channels = [self.backbone.channels[s] for s in STAGES]
        self.heads = PFEHeads(channels[-1], channels, int(cfg.MODEL.HEADS.NUM_CLASSES), p)
        if self.stage == 2 and self.side_loss == "cascade":
            sides = len(channels) - 1
            if len(self.temperatures) != sides:
                raise ValueError(
                    f"MODEL.PFE.TEMPERATURES={p.TEMPERATURES}; expected {sides} values (t_2..)"
                )

        self.frozen = self.stage == 2 and bool(p.FREEZE_MAIN)
        if self.frozen:
            for m in self.main_modules():
                m.requires_grad_(False)
        self.train(self.training)

    def main_modules(self):
        """list[nn.Module]: the main branch (backbone with its TSAMs, F_5's BN and FC)."""
        return [self.backbone] + self.heads.main_modules()

    @classmethod
    def build_evaluator(cls, cfg, make_evaluator):
        """The evaluator of a PFE config (the trainer's hook, ``ReidTrainer.build_evaluator``).

        Stage II with ``MODEL.PFE.EVAL_GROUPS`` ranks the test feature [F_2, .., F_5]
        (unprefixed metrics), F_5 alone (``F5/``) and [F_2, F_3, F_4] alone (``side/``) in one
        pass (:class:`FeatureGroupsEvaluator`); otherwise the test feature only.

        Args:
            cfg (CfgNode)
            make_evaluator (callable): a new ``TEST.EVALUATOR`` evaluator per call.
        Returns:
            DatasetEvaluator
        """
        p = cfg.MODEL.PFE
        if int(p.STAGE) != 2 or not bool(p.EVAL_GROUPS):
            return make_evaluator()
        return FeatureGroupsEvaluator(make_evaluator, int(p.SIDE_DIM) * (len(STAGES) - 1))

    def check_loaded(self, report):
        """Refuse a frozen stage-II main branch that the checkpoint did not fully provide.

        Called by reidzoo's ``Checkpointer`` after every load and when nothing is loaded
        (``MODEL.WEIGHTS`` ""). With the main branch frozen (stage II, ``FREEZE_MAIN``), every
        main-branch tensor (backbone with its TSAMs, F_5's BN: :data:`MAIN_PREFIXES`) must come
        from the file with its shape, and the file must hold no other main-branch tensor (a
        stage-I model of another TSAM setting); else the side branches would train on a
        random, frozen main branch. Side-branch tensors may be absent (they are new in stage
        II) and keep their initialisation; F_5's classifier is not checked (unused).

        Args:
            report (reidzoo.checkpoint.LoadReport): what the load put into the model.
        Raises:
            CheckpointMismatchError: main-branch tensors missing, reshaped or unexpected; the
                message lists them.
        """
        if not self.frozen:
            return
        own = self.state_dict()
        main = [k for k in own if k.startswith(MAIN_PREFIXES)]
        reshaped = {k: (a, b) for k, a, b in report.shapes}
        missing = sorted(k for k in report.missing if k.startswith(MAIN_PREFIXES))
        shapes = sorted(
            f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}"
            for k, (a, b) in reshaped.items()
            if k.startswith(MAIN_PREFIXES)
        )
        unexpected = sorted(k for k in report.unexpected if k.startswith(MAIN_PREFIXES))
        fix = (
            "Stage II (MODEL.PFE.STAGE 2, FREEZE_MAIN True) trains the side branches on the "
            "frozen main branch of a stage-I model: set MODEL.WEIGHTS to stage I's "
            "model_final.pth, trained with the same MODEL.BACKBONE and TSAM settings "
            "(MODEL.BACKBONE.INSERTS, MODEL.PFE.TSAM_*), or set MODEL.PFE.FREEZE_MAIN False "
            "to train the main branch too."
        )
        if not report.source:
            raise CheckpointMismatchError(
                f"MODEL.WEIGHTS is empty: the frozen main branch ({len(main)} tensors: "
                f"{_some(main)}) would keep its random initialisation. {fix}"
            )
        if missing or shapes or unexpected:
            parts = [
                f"\n  {title} ({len(items)}): {_some(items, 20)}"
                for title, items in (
                    ("missing main-branch keys", missing),
                    ("main-branch shape mismatches", shapes),
                    ("unexpected main-branch keys", unexpected),
                )
                if items
            ]
            raise CheckpointMismatchError(
                f"checkpoint '{report.source}' does not provide PFE's frozen main branch "
                f"exactly ({len(main)} tensors){''.join(parts)}\n  {fix}"
            )
        not_main = MAIN_PREFIXES + ("heads.main_fc.",)
        side = sorted(k for k in set(report.missing) | set(reshaped) if not k.startswith(not_main))
        if side:
            # none of the side branches in the file (a stage-I model): expected; only some of
            # them (a stage-II model of other side settings): worth a warning
            whole = len(side) == sum(not k.startswith(not_main) for k in own)
            (logger.info if whole else logger.warning)(
                "'%s': main branch loaded (%d tensors); %d side-branch tensors (%s) %s and keep "
                "their initialisation: right at the start of stage II; when evaluating, only "
                "the F5/ metrics then describe a trained feature",
                report.source,
                len(main),
                len(side),
                _some(side),
                "are not in the checkpoint" if whole else "are missing from it or reshaped",
            )

    def train(self, mode=True):
        """Set the mode; a frozen main branch stays in eval mode (BN statistics fixed).

        Args:
            mode (bool)
        Returns:
            PFE: self.
        """
        super().train(mode)
        if getattr(self, "frozen", False):
            for m in self.main_modules():
                m.eval()
        return self

    def features(self, images):
        """All features.

        Args:
            images (Tensor): [N, 3, H, W] normalised.
        Returns:
            dict: ``top`` (F_5 [N, C_5], before BN), ``top_bn`` ([N, C_5]); in stage 2 also
            ``side`` (F_2..F_4, each [N, SIDE_DIM]), ``side_bn`` (same, after BN), ``acts``
            (A_2..A_5, [N, H_s, W_s]) and ``masks`` (M_2..M_5, [N, 1, H_s, W_s]).
        """
        maps = self.backbone.forward_stages(images, STAGES)
        top = maps[STAGES[-1]].mean(dim=(2, 3))
        out = {"top": top, "top_bn": self.heads.main_neck(top)}
        if self.stage == 2:
            side, acts, masks = self.heads.mfa([maps[s] for s in STAGES])
            out["side"] = side
            out["side_bn"] = [bn(f) for bn, f in zip(self.heads.side_necks, side)]
            out["acts"], out["masks"] = acts, masks
        return out

    def forward(self, batched_inputs):
        """Args:
            batched_inputs (dict | Tensor): fast-reid batch (``images`` float 0-255
                [N, 3, H, W], ``targets`` [N] in training) or the images.
        Returns:
            Training: dict of named scalar losses (see :meth:`losses`). Eval: Tensor
            [N, D]: stage 2 [F_2, F_3, F_4, F_5] (3 * 512 + 2048 = 3584 for ResNet-50),
            stage 1 F_5 alone; post-BN unless ``TEST_FEAT`` is "before".
        """
        images = self.preprocess_image(batched_inputs)
        out = self.features(images)
        if not self.training:
            key = "_bn" if self.test_after_bn else ""
            feats = out.get("side" + key, []) + [out["top" + key]]
            return torch.cat(feats, dim=1) if len(feats) > 1 else feats[0]
        targets = batched_inputs["targets"].to(self.device)
        return self.losses(out, targets)

    def losses(self, out, targets):
        """Eq. 9: L_ID (Eq. 6, when the main branch trains: ``loss_cls``, ``loss_triplet``),
        the side losses (stage 2: ``loss_cascade_s2..s4`` / ``loss_independent_s2..s4`` /
        ``loss_uniform``) and ``loss_ro`` = w_ro * L_ro (stage 2, w_ro > 0).

        Args:
            out (dict): :meth:`features`.
            targets (Tensor): [N].
        Returns:
            dict[str, Tensor]
        """
        eps, alpha, ce_scale = self.ce
        losses = {}
        if not self.frozen:
            if self.heads.main_fc is None:
                raise ValueError("PFE training needs MODEL.HEADS.NUM_CLASSES > 0")
            logits = self.heads.main_fc(out["top_bn"])
            losses["loss_cls"] = cross_entropy_loss(logits, targets, eps, alpha) * ce_scale
            margin, norm, hard, tri_scale = self.tri
            losses["loss_triplet"] = (
                triplet_loss(out["top"], targets, margin, norm, hard) * tri_scale
            )
        if self.stage == 2:
            fcs = self.heads.side_fcs
            if fcs is None:
                raise ValueError("PFE training needs MODEL.HEADS.NUM_CLASSES > 0")
            side, top = out["side_bn"], out["top_bn"]
            if self.side_loss == "cascade":
                terms = cascade_loss(side, top, fcs, self.temperatures, targets, eps, alpha)
            elif self.side_loss == "independent":
                terms = independent_loss(side, fcs, targets, eps, alpha)
            else:
                terms = [uniform_loss(side, top, fcs[0], targets, eps, alpha)]
            if self.side_loss == "uniform":
                losses["loss_uniform"] = terms[0]
            else:
                for i, term in enumerate(terms):
                    losses[f"loss_{self.side_loss}_s{2 + i}"] = term  # F_2, F_3, F_4
            if self.ro_weight > 0:
                l_ro = region_overlap_loss(out["acts"], self.ro_reduction)
                losses["loss_ro"] = self.ro_weight * l_ro
        return losses
