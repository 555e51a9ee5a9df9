"""The PMM meta-architecture (§2.1, Fig. 2; spec §6.1), and BDB's layout in the same code.

ResNet trunk (layer4 stride 1; layer3 stride 1 as a switch) -> map x [N, C, H, W]. Stage I:
GAP(x) -> 1x1 conv + BN + ReLU (512) -> classifier. A fresh bottleneck ``part`` (shared by
stages II and III) gives x_part. Training: stage I's Grad-CAM (w.r.t. x) ranks blocks, the
top-K of x_part are replaced by a different identity's (A-Hard-Mix) -> GMP -> Linear + BN1d +
ReLU (512) -> classifier (stage II); stage II's Grad-CAM on its mixed input gives the mask that
is applied to the *unmixed* x_part with a fresh negative for stage III. Eval: no mixing, the
three 512-d features concatenated (1536-d), Euclidean distance. Every new layer lives under
``self.heads``.
"""

import torch
from fastreid.modeling.backbones.resnet import Bottleneck
from fastreid.modeling.losses import cross_entropy_loss, triplet_loss
from torch import nn

from reidzoo.modeling import ReidMetaArch, build_staged_resnet
from reidzoo.registry import META_ARCH_REGISTRY

from .modules import FeatureMix, grad_cam

LAYOUTS = ("pmm", "bdb")


def _init_kaiming(m):
    """BDB / PMM code's ``weights_init_kaiming``: fan-out Kaiming weights, zero bias, BN 1/0."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(m.weight, a=0, mode="fan_out")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def set_layer_stride(layer, stride):
    """Set the spatial stride of the first block of a ResNet stage (its strided conv and its
    downsample), in place.

    Args:
        layer (nn.Sequential): a ResNet stage.
        stride (int)
    """
    block = layer[0]
    conv = block.conv2 if hasattr(block, "conv3") else block.conv1
    conv.stride = (stride, stride)
    if block.downsample is not None:
        block.downsample[0].stride = (stride, stride)


class GlobalReduction(nn.Module):
    """Stage I reduction: 1x1 conv (bias) + BN2d + ReLU on the GAP vector (§2.1, code L233)."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, dim, 1)
        self.bn = nn.BatchNorm2d(dim)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, z):
        """Args:
            z (Tensor): [N, C].
        Returns:
            Tensor: [N, dim]."""
        return self.relu(self.bn(self.conv(z[:, :, None, None]))).flatten(1)


class PartReduction(nn.Sequential):
    """Stage II / III (and BDB part) reduction: Linear + BN1d + ReLU on the GMP vector."""

    def __init__(self, in_dim, dim):
        super().__init__(nn.Linear(in_dim, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True))


class PMMHeads(nn.Module):
    """All new layers: the shared part bottleneck, one reduction and classifier per stage.

    Args:
        channels (int): trunk output channels C (2048 for ResNet-50).
        dims (list[int]): embedding size per stage ([512, 512, 512]; BDB [512, 1024]).
        num_classes (int): identities; <= 0 builds no classifiers (inference / counting).
        bn_norm (str): norm of the part bottleneck (MODEL.BACKBONE.NORM).
    """

    def __init__(self, channels, dims, num_classes, bn_norm="BN"):
        super().__init__()
        self.part = Bottleneck(channels, channels // 4, bn_norm)  # fresh (§2.1, code L246)
        self.reductions = nn.ModuleList(
            [GlobalReduction(channels, dims[0])] + [PartReduction(channels, d) for d in dims[1:]]
        )
        self.reductions.apply(_init_kaiming)
        self.classifiers = nn.ModuleList()
        if num_classes > 0:
            for d in dims:
                fc = nn.Linear(d, num_classes)
                _init_kaiming(fc)
                self.classifiers.append(fc)


@META_ARCH_REGISTRY.register()
class PMM(ReidMetaArch):
    """Progressive multi-stage feature mix network; ``MODEL.META_ARCHITECTURE: PMM``.

    Args:
        cfg (CfgNode): uses ``MODEL.PMM``, ``MODEL.BACKBONE``, ``MODEL.HEADS.NUM_CLASSES``,
            ``MODEL.LOSSES`` (CE EPSILON/SCALE, TRI MARGIN/NORM_FEAT/HARD_MINING/SCALE) and
            ``MODEL.PIXEL_MEAN/STD``.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        p = cfg.MODEL.PMM
        if p.LAYOUT not in LAYOUTS:
            raise ValueError(f"MODEL.PMM.LAYOUT={p.LAYOUT!r}; expected one of {LAYOUTS}")
        if int(p.LAYER3_STRIDE) not in (1, 2):
            raise ValueError(f"MODEL.PMM.LAYER3_STRIDE={p.LAYER3_STRIDE}; expected 1 or 2")
        self.layout = p.LAYOUT
        self.backbone = build_staged_resnet(cfg)
        set_layer_stride(self.backbone.layer3, int(p.LAYER3_STRIDE))
        channels = self.backbone.channels["layer4"]
        dim = int(p.REDUCTION_DIM)
        dims = [dim, dim, dim] if self.layout == "pmm" else [dim, int(p.BDB_PART_DIM)]
        self.heads = PMMHeads(channels, dims, int(cfg.MODEL.HEADS.NUM_CLASSES),
                              cfg.MODEL.BACKBONE.NORM)  # fmt: skip
        self.mix = FeatureMix(
            p.MIX,
            p.BLOCK_CHOICE,
            tuple(p.BLOCK_SIZE),
            int(p.TOPK),
            (p.BDB_HEIGHT_RATIO, p.BDB_WIDTH_RATIO),
            p.CUTMIX_ALPHA,
        )

    @property
    def num_stages(self):
        """int: 3 for PMM, 2 for BDB's layout."""
        return len(self.heads.reductions)

    def trunk(self, images):
        """Args:
            images (Tensor): [N, 3, H, W] normalised.
        Returns:
            tuple[Tensor, Tensor]: x [N, C, h, w] (backbone) and x_part = part(x)."""
        x = self.backbone(images)
        return x, self.heads.part(x)

    def forward(self, batched_inputs):
        """Args:
            batched_inputs (dict | Tensor): fast-reid batch (``images`` float 0-255
                [N, 3, H, W], ``targets`` [N] in training) or the images.
        Returns:
            dict[str, Tensor] in training: ``loss_cls_stage<k>`` and ``loss_triplet_stage<k>``
            for k = 1..3 (1..2 for BDB's layout). In eval: Tensor [N, 1536], the stage
            features concatenated (no mixing).
        """
        images = self.preprocess_image(batched_inputs)
        x, xp = self.trunk(images)
        if not self.training:
            red = self.heads.reductions
            feats = [red[0](x.mean(dim=(2, 3)))]
            feats += [r(xp.amax(dim=(2, 3))) for r in red[1:]]
            return torch.cat(feats, dim=1)
        targets = batched_inputs["targets"].to(self.device)
        return self.losses(self.training_stages(x, xp, targets), targets)

    def _head(self, k, pooled):
        """Reduction and classifier of stage k in fp32 (so the Grad-CAM gradient cannot
        underflow under AMP, spec §6.3)."""
        with torch.autocast(pooled.device.type, enabled=False):
            feat = self.heads.reductions[k](pooled.float())
            if len(self.heads.classifiers) != self.num_stages:
                raise ValueError("PMM training needs MODEL.HEADS.NUM_CLASSES > 0")
            return feat, self.heads.classifiers[k](feat)

    def training_stages(self, x, xp, targets):
        """Run the stages with the progressive mixing (§2.1-2.2).

        Args:
            x (Tensor): [N, C, h, w] backbone output (stage I input; its CAM guides stage II).
            xp (Tensor): [N, C, h, w] part-trunk output (unmixed stage II / III input).
            targets (Tensor): [N] labels.
        Returns:
            list[dict]: per stage ``feat`` [N, D], ``logits`` [N, ids], ``input`` (the map
            pooled), ``cam`` ([N, h, w] or None), ``mix`` (FeatureMix output, None for I).
        """
        stages = []
        cam = None
        with torch.enable_grad():  # Grad-CAM needs the head graph even under no_grad
            for k in range(self.num_stages):
                if k == 0:
                    fmap, mix = x, None
                    pooled = x.mean(dim=(2, 3))  # GAP (stage I)
                else:
                    mix = self.mix(xp, cam, targets)  # always on the unmixed x_part
                    fmap = mix["features"]
                    pooled = fmap.amax(dim=(2, 3))  # GMP (stages II, III)
                if not pooled.requires_grad:
                    pooled = pooled.detach().requires_grad_()
                feat, logits = self._head(k, pooled)
                need = k + 1 < self.num_stages and self.mix.needs_cam
                cam = grad_cam(logits, targets, pooled, fmap) if need else None
                stages.append(
                    {"feat": feat, "logits": logits, "input": fmap, "cam": cam, "mix": mix}
                )
        return stages

    def losses(self, stages, targets):
        """Per stage: label-smoothed CE (mixed as lam CE(y) + (1 - lam) CE(y[index]) for the
        CutMix variants) and batch-hard soft-margin triplet (TRI.MARGIN 0) on the reduced
        feature, unit weights (spec §6.4).

        Args:
            stages (list[dict]): from :meth:`training_stages`.
            targets (Tensor): [N].
        Returns:
            dict[str, Tensor]: named scalar losses.
        """
        out = {}
        eps, alpha, ce_scale = self.ce
        margin, norm, hard, tri_scale = self.tri
        for k, s in enumerate(stages):
            tag = f"stage{k + 1}"
            if "CrossEntropyLoss" in self.loss_names:
                ce = cross_entropy_loss(s["logits"], targets, eps, alpha)
                mix = s["mix"]
                if mix is not None and self.mix.mixes_labels:
                    lam = mix["lam"]
                    other = cross_entropy_loss(s["logits"], targets[mix["index"]], eps, alpha)
                    ce = lam * ce + (1.0 - lam) * other
                out[f"loss_cls_{tag}"] = ce * ce_scale
            if "TripletLoss" in self.loss_names:
                tri = triplet_loss(s["feat"], targets, margin, norm, hard)
                out[f"loss_triplet_{tag}"] = tri * tri_scale
        return out
