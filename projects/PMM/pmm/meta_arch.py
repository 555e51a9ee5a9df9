"""The PMM meta-architecture (§2.1, Fig. 2; docs/decisions/pmm.md#architecture), and BDB's
layout in the same code.

ResNet trunk (layer4 stride 1; layer3 stride 1 as a switch) -> map x [N, C, H, W]. Stage I:
GAP(x) -> 1x1 conv + BN + ReLU (512) -> classifier. A fresh bottleneck ``part`` (shared by
stages II and III) gives x_part. Training: stage I's Grad-CAM (w.r.t. x) ranks blocks, the
top-K of x_part are replaced by a different identity's (A-Hard-Mix) -> GMP -> Linear + BN1d +
ReLU (512) -> classifier (stage II); stage II's Grad-CAM on its mixed input gives the mask that
is applied to the *unmixed* x_part with a fresh negative for stage III. Eval: no mixing, the
three 512-d features concatenated (1536-d), Euclidean distance. Every new layer lives under
``self.heads``. Blocks: the fixed ``MODEL.PMM.BLOCK_GRID`` (8 x 4) over the map, checked against
the training map size at construction. Optionally (``MODEL.PMM.IMAGE_MIX``) an image-level
CutMix / A-CutMix of the batch before the backbone, with every stage's labels mixed.
"""

import torch
from fastreid.modeling.backbones.resnet import Bottleneck
from fastreid.modeling.losses import cross_entropy_loss, triplet_loss
from torch import nn

from reidzoo.modeling import ReidMetaArch, build_staged_resnet
from reidzoo.modeling.backbone import set_stage_stride
from reidzoo.registry import META_ARCH_REGISTRY

from .image_mix import build_image_mix
from .modules import FeatureMix, grad_cam, grid_block_size

LAYOUTS = ("pmm", "bdb")


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _layer_out(size, layer):
    """Output (H, W) of a Conv2d / MaxPool2d on an input of ``size`` (PyTorch's formula)."""
    k, s, p, d = (_pair(getattr(layer, a)) for a in ("kernel_size", "stride", "padding",
                                                      "dilation"))  # fmt: skip
    ceil = getattr(layer, "ceil_mode", False)
    out = []
    for i in range(2):
        num = size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1
        out.append((-(-num // s[i]) if ceil else num // s[i]) + 1)
    return tuple(out)


def _init_kaiming(m):
    """BDB / PMM code's ``weights_init_kaiming``: fan-out Kaiming weights, zero bias, BN 1/0."""
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(m.weight, a=0, mode="fan_out")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


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
        set_stage_stride(self.backbone.layer3, int(p.LAYER3_STRIDE))
        channels = self.backbone.channels["layer4"]
        dim = int(p.REDUCTION_DIM)
        dims = [dim, dim, dim] if self.layout == "pmm" else [dim, int(p.BDB_PART_DIM)]
        self.heads = PMMHeads(channels, dims, int(cfg.MODEL.HEADS.NUM_CLASSES),
                              cfg.MODEL.BACKBONE.NORM)  # fmt: skip
        self.mix = FeatureMix(cfg)
        self.image_mix = build_image_mix(cfg)  # image-level Table 3 rows (None: off)
        if self.image_mix is not None and self.mix.mixes_labels:
            raise ValueError(
                f"MODEL.PMM.IMAGE_MIX={p.IMAGE_MIX!r} mixes labels and so does MODEL.PMM.MIX="
                f"{p.MIX!r}; use one of them (the image-level Table 3 rows set MIX none)"
            )
        self.check_geometry(cfg)

    def feature_map_size(self, input_size):
        """Size of the backbone map x (and x_part) for an input size, from the backbone's own
        convolution and pooling settings (strides as set, e.g. ``LAYER3_STRIDE``), without
        running it. Inserted and non-local modules keep the size.

        Args:
            input_size (Sequence[int]): (H, W) of the input images.
        Returns:
            tuple[int, int]: (h, w) of the layer4 output.
        """
        b = self.backbone
        size = tuple(int(v) for v in input_size)
        for layer in (b.conv1, b.maxpool):
            size = _layer_out(size, layer)
        for name in ("layer1", "layer2", "layer3", "layer4"):
            for blk in getattr(b, name).blocks():
                for conv in (blk.conv1, blk.conv2, getattr(blk, "conv3", None)):
                    if conv is not None:
                        size = _layer_out(size, conv)
        return size

    def check_geometry(self, cfg):
        """Refuse, at construction, a training geometry whose map the block grid cannot cut
        into the paper's fraction (K of rows x cols blocks), naming the keys and the map size.

        Args:
            cfg (CfgNode): reads ``INPUT.SIZE_TRAIN`` and ``MODEL.PMM``.
        """
        p = cfg.MODEL.PMM
        image_grid = self.image_mix is not None and self.image_mix.needs_cam
        if not (self.mix.uses_blocks or image_grid):
            return
        size = tuple(int(v) for v in cfg.INPUT.SIZE_TRAIN)
        h, w = self.feature_map_size(size)
        try:
            block = grid_block_size(h, w, self.mix.block_grid, int(p.TOPK))
        except ValueError as e:
            raise ValueError(
                f"{e}. Here INPUT.SIZE_TRAIN={list(size)} gives a {h}x{w} map "
                f"(MODEL.PMM.LAYER3_STRIDE={p.LAYER3_STRIDE}, MODEL.BACKBONE.LAST_STRIDE="
                f"{cfg.MODEL.BACKBONE.LAST_STRIDE}). To evaluate a model trained at another "
                "geometry, MODEL.PMM.MIX none (and MODEL.PMM.IMAGE_MIX none) skips this "
                "training-time check"
            ) from None
        if len(p.BLOCK_SIZE) and tuple(int(v) for v in p.BLOCK_SIZE) != block:
            raise ValueError(
                f"MODEL.PMM.BLOCK_SIZE={list(p.BLOCK_SIZE)}, but MODEL.PMM.BLOCK_GRID="
                f"{list(p.BLOCK_GRID)} cuts the {h}x{w} map of INPUT.SIZE_TRAIN={list(size)} "
                f"into {list(block)} blocks; the block size is derived from the map now: "
                "remove BLOCK_SIZE (or set [])"
            )
        if image_grid:
            self.image_mix.check_image(*size)

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
        if not self.training:
            x, xp = self.trunk(images)
            red = self.heads.reductions
            feats = [red[0](x.mean(dim=(2, 3)))]
            feats += [r(xp.amax(dim=(2, 3))) for r in red[1:]]
            return torch.cat(feats, dim=1)
        targets = batched_inputs["targets"].to(self.device)
        image_mix = None
        if self.image_mix is not None:  # image-level CutMix / A-CutMix (Table 1)
            image_mix = self.image_mix(images, targets, self.clean_cam)
            images = image_mix["images"]
        x, xp = self.trunk(images)
        return self.losses(self.training_stages(x, xp, targets), targets, image_mix)

    def clean_cam(self, images, targets):
        """Stage I's Grad-CAM (ground-truth class) of a batch, for image-level A-CutMix: the
        backbone and heads in eval mode (running BN statistics, none updated) and without
        gradients, so the pass changes no state; only the small stage-I head is
        back-propagated (w.r.t. its pooled input, §6.3).

        Args:
            images (Tensor): [N, 3, H, W] normalised.
            targets (Tensor): [N].
        Returns:
            Tensor: [N, h, w] detached CAM on the backbone map.
        """
        modes = [(m, m.training) for m in (self.backbone, self.heads)]
        try:
            for m, _ in modes:
                m.eval()
            with torch.no_grad():
                x = self.backbone(images)
            with torch.enable_grad():
                pooled = x.mean(dim=(2, 3)).detach().requires_grad_()
                _, logits = self._head(0, pooled)
                return grad_cam(logits, targets, pooled, x, retain_graph=False)
        finally:
            for m, mode in modes:
                m.train(mode)

    def _head(self, k, pooled):
        """Reduction and classifier of stage k in fp32 (so the Grad-CAM gradient cannot
        underflow under AMP, docs/decisions/pmm.md#grad-cam)."""
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

    def losses(self, stages, targets, image_mix=None):
        """Per stage: label-smoothed CE (mixed as lam CE(y) + (1 - lam) CE(y[index]) for the
        CutMix variants: every stage after an image-level mix, stages II / III after a
        feature-level one) and batch-hard soft-margin triplet (TRI.MARGIN 0) on the reduced
        feature with the anchors' labels, unit weights (docs/decisions/pmm.md#losses).

        Args:
            stages (list[dict]): from :meth:`training_stages`.
            targets (Tensor): [N].
            image_mix (dict | None): the image-level mix of the batch (``index``, ``lam``).
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
                mix = s["mix"] if self.mix.mixes_labels else None
                if image_mix is not None and image_mix["index"] is not None:
                    mix = image_mix
                if mix is not None:
                    lam = mix["lam"]
                    other = cross_entropy_loss(s["logits"], targets[mix["index"]], eps, alpha)
                    ce = lam * ce + (1.0 - lam) * other
                out[f"loss_cls_{tag}"] = ce * ce_scale
            if "TripletLoss" in self.loss_names:
                tri = triplet_loss(s["feat"], targets, margin, norm, hard)
                out[f"loss_triplet_{tag}"] = tri * tri_scale
        return out
