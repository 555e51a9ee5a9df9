"""The RMGL meta-architecture (§III-A, Fig. 2; decisions: docs/decisions/rmgl.md).

A shared trunk (stem + layer1, i.e. up to res_conv2c) splits into one branch per granularity
n_s (Local-2, Local-3), each a deep copy of layer2-4 with last stride 1. Each branch runs two
paths with the same weights: the original map (global GMP + ABP stripes) and the receptive-
partitioned map (stripes cut at ``RP_POSITION``, run as separate samples, re-stacked; global +
its K shards). Every pooled 2048-d vector gets its own 1x1 conv + BN reduction to 256-d and its
own classifier, all under ``self.heads`` (10x learning rate). Losses: CE on every feature and
one batch-hard triplet per branch on the branch's concatenated features (Eq. 2-4).
"""

import copy

import torch
from fastreid.modeling.losses import cross_entropy_loss, triplet_loss
from torch import nn

from reidzoo.modeling import ReidMetaArch
from reidzoo.modeling.backbone import build_staged_resnet, set_stage_stride
from reidzoo.registry import META_ARCH_REGISTRY

from .modules import (
    ActivationBalancedPooling,
    check_partition,
    global_pool,
    receptive_partition,
    uniform_stripe_pool,
)

SPLITS = ("layer1", "layer3_0")
PATHS = ("dual", "rp", "original")
POSITIONS = ("input", "stem", "layer1", "layer2", "layer3_0", "layer3", "layer4")


class _Stem(nn.Module):
    """conv1, bn1, relu, maxpool of a backbone (a view, shares its modules)."""

    def __init__(self, backbone):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = (
            backbone.conv1,
            backbone.bn1,
            backbone.relu,
            backbone.maxpool,
        )

    def forward(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class Reduction(nn.Sequential):
    """1x1 conv (no bias) + BN (+ optional ReLU): 2048 -> 256 (§III-A)."""

    def __init__(self, in_dim, out_dim, relu=False):
        layers = [nn.Conv2d(in_dim, out_dim, 1, bias=False), nn.BatchNorm2d(out_dim)]
        if relu:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        nn.init.kaiming_normal_(self[0].weight, mode="fan_in")
        nn.init.ones_(self[1].weight)
        nn.init.zeros_(self[1].bias)

    def forward(self, x):
        """Args:
            x (Tensor): [B, C_in].
        Returns:
            Tensor: [B, C_out]."""
        return super().forward(x[:, :, None, None]).flatten(1)


class RMGLHeads(nn.Module):
    """All new layers of RMGL: one reduction and one classifier per feature.

    Args:
        names (list[str]): feature names, in output order.
        in_dim (int): pooled feature size (2048).
        dim (int): reduced size (256).
        num_classes (int): identities; <= 0 builds no classifiers (inference / counting).
        relu (bool): ReLU after the reduction BN.
    """

    def __init__(self, names, in_dim, dim, num_classes, relu=False):
        super().__init__()
        self.names = list(names)
        self.reductions = nn.ModuleList(Reduction(in_dim, dim, relu) for _ in names)
        self.classifiers = nn.ModuleList()
        if num_classes > 0:
            for _ in names:
                fc = nn.Linear(dim, num_classes, bias=False)
                nn.init.normal_(fc.weight, std=0.001)
                self.classifiers.append(fc)

    def forward(self, pooled):
        """Args:
            pooled (list[Tensor]): one [N, in_dim] per feature.
        Returns:
            list[Tensor]: one [N, dim] per feature."""
        return [red(p) for red, p in zip(self.reductions, pooled)]


@META_ARCH_REGISTRY.register()
class RMGL(ReidMetaArch):
    """Receptive multi-granularity network; ``MODEL.META_ARCHITECTURE: RMGL``.

    Args:
        cfg (CfgNode): uses ``MODEL.RMGL``, ``MODEL.BACKBONE``, ``MODEL.HEADS.NUM_CLASSES``,
            ``MODEL.LOSSES`` (CE EPSILON/SCALE, TRI MARGIN/NORM_FEAT/HARD_MINING/SCALE),
            ``MODEL.PIXEL_MEAN/STD``.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        r = cfg.MODEL.RMGL
        self.granularities = [int(k) for k in r.GRANULARITIES]
        if not self.granularities or min(self.granularities) < 1:
            raise ValueError(f"MODEL.RMGL.GRANULARITIES={r.GRANULARITIES}; expected ints >= 1")
        if len(set(self.granularities)) != len(self.granularities):
            raise ValueError(f"MODEL.RMGL.GRANULARITIES={r.GRANULARITIES} has duplicates")
        for key, value, allowed in (
            ("SPLIT_AFTER", r.SPLIT_AFTER, SPLITS),
            ("PATHS", r.PATHS, PATHS),
            ("RP_POSITION", r.RP_POSITION, POSITIONS),
            ("POOL", r.POOL, ("max", "avg")),
        ):
            if value not in allowed:
                raise ValueError(f"MODEL.RMGL.{key}={value!r}; expected one of {allowed}")
        self.paths = r.PATHS
        self.pool = r.POOL
        self.abp_train, self.abp_test = bool(r.ABP_TRAIN), bool(r.ABP_TEST)
        self.abp_ties = r.ABP_TIES

        backbone = build_staged_resnet(cfg)
        # Segments of every branch's path: shared trunk segments, then the branch's copies.
        trunk = [("stem", _Stem(backbone)), ("layer1", backbone.layer1)]
        if r.SPLIT_AFTER == "layer3_0":
            trunk += [("layer2", backbone.layer2), ("layer3_0", backbone.layer3[:1])]
            tail = [("layer3", backbone.layer3[1:]), ("layer4", backbone.layer4)]
        else:
            tail = [(s, getattr(backbone, s)) for s in ("layer2", "layer3", "layer4")]
        self.trunk_names = [n for n, _ in trunk]
        self.trunk = nn.ModuleList(m for _, m in trunk)
        self.branch_names = [n for n, _ in tail]
        self.branches = nn.ModuleList()
        for _ in self.granularities:
            seq = nn.ModuleList(copy.deepcopy(m) for _, m in tail)
            set_stage_stride(seq[-1], int(r.BRANCH_LAST_STRIDE))
            self.branches.append(seq)
        self.stride = 8 * int(r.BRANCH_LAST_STRIDE) * 2  # stem 4, layer2 2, layer3 2, layer4
        names = self.segment_names
        if r.RP_POSITION != "input" and r.RP_POSITION not in names:
            raise ValueError(
                f"MODEL.RMGL.RP_POSITION={r.RP_POSITION!r} is not a boundary of this network; "
                f"expected 'input' or one of {names}"
            )
        self.rp_index = 0 if r.RP_POSITION == "input" else names.index(r.RP_POSITION) + 1

        self.abp = nn.ModuleList(
            ActivationBalancedPooling(cfg, k) if k > 1 else nn.Identity()
            for k in self.granularities
        )
        channels = backbone.channels["layer4"]
        self.heads = RMGLHeads(
            self.feature_names(),
            channels,
            int(r.REDUCTION_DIM),
            int(cfg.MODEL.HEADS.NUM_CLASSES),
            bool(r.REDUCTION_RELU),
        )

    @property
    def segment_names(self):
        """list[str]: names of a branch path's segments, trunk first."""
        return self.trunk_names + self.branch_names

    def path_modules(self, b):
        """Modules of branch ``b``'s path in order (for :func:`receptive_field`).

        Returns:
            list[nn.Module]"""
        return list(self.trunk) + list(self.branches[b])

    def branch_tag(self, b):
        """str: name of branch ``b``: ``local<K>``, or ``global`` for K = 1."""
        k = self.granularities[b]
        return f"local{k}" if k > 1 else "global"

    def _branch_paths(self, b):
        """list[str]: the paths of branch ``b`` ("original", "rp")."""
        if self.granularities[b] == 1:
            return ["original"]  # a Global branch: one global feature (§IV-D)
        return {"dual": ["original", "rp"], "rp": ["rp"], "original": ["original"]}[self.paths]

    def feature_names(self):
        """Names of the output features in order, e.g. ``local2_orig_global``, ``local3_rp_s2``.

        Returns:
            list[str]"""
        names = []
        for b, k in enumerate(self.granularities):
            for path in self._branch_paths(b):
                tag = "orig" if path == "original" else "rp"
                parts = ["global"] + ([f"s{i + 1}" for i in range(k)] if k > 1 else [])
                names += [f"{self.branch_tag(b)}_{tag}_{p}" for p in parts]
        return names

    def _run(self, b, x, start, stop):
        """Run segments [start, stop) of branch ``b``'s path."""
        mods = self.path_modules(b)
        for m in mods[start:stop]:
            x = m(x)
        return x

    def pooled_features(self, images):
        """All pooled (not yet reduced) features, in :meth:`feature_names` order.

        Args:
            images (Tensor): [N, 3, H, W] normalised; H divisible by 16 * n_s for every n_s.
        Returns:
            list[Tensor]: each [N, 2048].
        """
        height = images.shape[2]
        for k in self.granularities:
            check_partition(int(height), k, self.stride)
        n_trunk = len(self.trunk)
        n_all = n_trunk + len(self.branch_names)
        trunk_out = [images]
        for m in self.trunk:
            trunk_out.append(m(trunk_out[-1]))
        use_abp = self.abp_train if self.training else self.abp_test
        out = []
        for b, k in enumerate(self.granularities):
            paths = self._branch_paths(b)
            # original path, keeping the intermediates the RP path may start from
            inter = list(trunk_out)
            need = n_all if "original" in paths else max(self.rp_index, n_trunk)
            x = inter[-1]
            for m in self.branches[b][: need - n_trunk]:
                x = m(x)
                inter.append(x)
            for path in paths:
                if path == "original":
                    y = inter[n_all]
                    out.append(global_pool(y, self.pool))
                    if k > 1:
                        parts = self.abp[b](y) if use_abp else uniform_stripe_pool(y, k, self.pool)
                        out += list(parts.unbind(1))
                else:
                    y = receptive_partition(
                        inter[self.rp_index],
                        lambda t, b=b: self._run(b, t, self.rp_index, n_all),
                        k,
                    )
                    out.append(global_pool(y, self.pool))
                    out += list(uniform_stripe_pool(y, k, self.pool).unbind(1))
        return out

    def forward(self, batched_inputs):
        """Args:
            batched_inputs (dict | Tensor): fast-reid batch (``images`` float 0-255
                [N, 3, H, W], ``targets`` [N] in training) or the images.
        Returns:
            dict[str, Tensor] in training: ``loss_cls_<feature>`` (one per feature) and
            ``loss_triplet_<branch>`` (one per branch, e.g. ``loss_triplet_local2``). In eval:
            Tensor [N, F * 256] (F = 14: 3584-d), the reduced features concatenated.
        """
        images = self.preprocess_image(batched_inputs)
        feats = self.heads(self.pooled_features(images))
        if not self.training:
            return torch.cat(feats, dim=1)
        targets = batched_inputs["targets"].to(self.device)
        return self.losses(feats, targets)

    def losses(self, feats, targets):
        """Eq. 4: CE on each feature (weight ``CE.SCALE``) + one batch-hard triplet per branch
        on its concatenated features (margin ``TRI.MARGIN``, weight ``TRI.SCALE``).

        Args:
            feats (list[Tensor]): reduced features, each [N, 256].
            targets (Tensor): [N] identity labels.
        Returns:
            dict[str, Tensor]: named scalar losses.
        """
        out = {}
        names = self.heads.names
        if "CrossEntropyLoss" in self.loss_names:
            if len(self.heads.classifiers) != len(feats):
                raise ValueError("RMGL training needs MODEL.HEADS.NUM_CLASSES > 0")
            eps, alpha, scale = self.ce
            for name, f, fc in zip(names, feats, self.heads.classifiers):
                out[f"loss_cls_{name}"] = cross_entropy_loss(fc(f), targets, eps, alpha) * scale
        if "TripletLoss" in self.loss_names:
            margin, norm, hard, scale = self.tri
            for b in range(len(self.granularities)):
                tag = self.branch_tag(b)
                branch = [f for name, f in zip(names, feats) if name.startswith(f"{tag}_")]
                out[f"loss_triplet_{tag}"] = (
                    triplet_loss(torch.cat(branch, 1), targets, margin, norm, hard) * scale
                )
        return out
