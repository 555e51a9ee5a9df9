"""PAN's head: part extraction (PLM or stripes), PAM fusion and the per-part embeddings,
BNNecks and classifiers (§3, §4.1; spec §4.2-4.6). Everything new lives here, so a model
that stores it as ``self.heads`` trains it at ``SOLVER.HEADS_LR_FACTOR`` (§4.1: 10x)."""

from fractions import Fraction

import torch
from fastreid.layers import get_norm
from torch import nn

from reidzoo.modeling.backbone import STAGES
from reidzoo.registry import HEADS_REGISTRY

from .modules import PAM, PLM, ConvConnection, NonLocal, StripeParts, grid_resampler

CONNECTIONS = ("pam", "conv", "identity")


def stage_widths(feat_dim):
    """Output channels of ResNet stages from the layer4 width (C_l = FEAT_DIM / 2^(4-l)), for a
    head built before (or without) the backbone; a built stage reports its own with
    :func:`reidzoo.modeling.backbone.stage_channels`.

    Args:
        feat_dim (int): ``MODEL.BACKBONE.FEAT_DIM`` (2048 for ResNet-50, 512 for ResNet-18).
    Returns:
        dict[str, int]: stage -> channels.
    """
    return {s: feat_dim >> (3 - i) for i, s in enumerate(STAGES)}


@HEADS_REGISTRY.register()
class PANHead(nn.Module):
    """PAN head, ``MODEL.HEADS.NAME: PANHead``.

    Per part i: ``e_i = [P_i; Z^1_i; Z^2_i; Z^3_i]`` (PAN_c) or ``P_i + sum_l Z^l_i`` (PAN_a),
    a 1x1 embedding to ``EMBED_DIM`` (no bias), a BNNeck (frozen bias) and a bias-free
    classifier. Also holds the optional non-local blocks of Table 2 (run by the ``PAN``
    meta-architecture between backbone stages).

    ``MODEL.PAN.CONNECTION`` chooses how Z^l_i is made from X^l (Table 2): "pam" (Eq. 1-3),
    "conv" (Conv_a / Conv_c: a :class:`ConvConnection` cascade on X^l, then pooled with the
    part masks s_j) or "identity" (Baseline_w: X^l itself pooled with the part masks).

    Inside fast-reid's ``Baseline`` (which passes only the layer4 map) it works with
    ``MODEL.PAN.PAM_STAGES: []``; Baseline's CE then sees the first part's logits only
    (``cls_outputs``) and its triplet the concatenated embeddings (``features``).

    Args:
        cfg (CfgNode): uses ``MODEL.PAN``, ``MODEL.BACKBONE.FEAT_DIM``/``NORM``,
            ``MODEL.HEADS.NUM_CLASSES``/``NORM``.
    """

    def __init__(self, cfg):
        super().__init__()
        pc = cfg.MODEL.PAN
        feat_dim = cfg.MODEL.BACKBONE.FEAT_DIM
        channels = stage_widths(feat_dim)
        if pc.PARTS == "plm":
            self.parts = PLM(
                feat_dim, pc.SCALES, pc.SA_DIM, pc.CA_REDUCTION, pc.CA_ACT, cfg.MODEL.HEADS.NORM
            )
        elif pc.PARTS == "stripes":
            self.parts = StripeParts(pc.NUM_STRIPES)
        else:
            raise ValueError(f"MODEL.PAN.PARTS={pc.PARTS!r}; expected 'plm' or 'stripes'")
        if pc.FUSION not in ("concat", "add"):
            raise ValueError(f"MODEL.PAN.FUSION={pc.FUSION!r}; expected 'concat' or 'add'")
        if pc.CONNECTION not in CONNECTIONS:
            raise ValueError(
                f"MODEL.PAN.CONNECTION={pc.CONNECTION!r}; expected one of {CONNECTIONS}"
            )
        for key, value, allowed in (
            ("TRIPLET_FEAT", pc.TRIPLET_FEAT, ("before", "after")),
            ("TEST_FEAT", pc.TEST_FEAT, ("before", "after")),
            ("ORTH_MASKS", pc.ORTH_MASKS, ("raw", "normalized")),
        ):
            if value not in allowed:
                raise ValueError(f"MODEL.PAN.{key}={value!r}; expected one of {allowed}")
        stages = list(pc.PAM_STAGES)
        connection = pc.CONNECTION
        if connection == "pam" and len(pc.PAM_DIMS) != len(stages) and stages:
            raise ValueError(
                f"MODEL.PAN.PAM_DIMS={list(pc.PAM_DIMS)} needs one D per PAM stage {stages}"
            )
        for s in stages + list(pc.NL_STAGES):
            if s not in STAGES:
                raise ValueError(f"MODEL.PAN stage {s!r}; expected one of {STAGES}")
        self.fusion = pc.FUSION
        self.connection = connection
        # every stage whose output the head needs; pam_stages: the subset attended to by PAM
        self.connected_stages = tuple(stages)
        self.pam_stages = self.connected_stages if connection == "pam" else ()
        self.pam = nn.ModuleDict(
            {
                s: PAM(channels[s], feat_dim, int(d), channels[s] if self.fusion == "concat"
                       else feat_dim, norm=pc.PAM_NORM)
                for s, d in zip(self.pam_stages, pc.PAM_DIMS)
            }
        )  # fmt: skip
        self.conv = nn.ModuleDict()
        # conv / identity: each connected map is brought to X^4's grid by a fixed resampling;
        # X^l's stride relative to X^4 is the product of the later stages' strides (2, 2, last)
        last_stride = int(cfg.MODEL.BACKBONE.LAST_STRIDE)
        to_x4 = {"layer1": 4 * last_stride, "layer2": 2 * last_stride, "layer3": last_stride,
                 "layer4": 1}  # fmt: skip
        self.resample = nn.ModuleDict()
        last = STAGES.index("layer4")
        for s in stages if connection != "pam" else ():
            ratio = Fraction(1, to_x4[s])
            if connection == "conv":
                blocks = last - STAGES.index(s)
                if blocks < 1:
                    raise ValueError(
                        f"MODEL.PAN.PAM_STAGES contains {s!r}: with CONNECTION 'conv' only "
                        f"stages before layer4 can be connected (one conv block per later stage)"
                    )
                conv_stride = int(pc.CONV_LAST_STRIDE)
                self.conv[s] = ConvConnection(
                    channels[s], blocks, widen=self.fusion == "add", stride=2,
                    last_stride=conv_stride, norm=cfg.MODEL.HEADS.NORM,
                )  # fmt: skip
                ratio *= 2 ** (blocks - 1) * conv_stride
            self.resample[s] = grid_resampler(ratio)
        if connection == "identity" and self.fusion == "add":
            wrong = [s for s in stages if channels[s] != feat_dim]
            if wrong:
                raise ValueError(
                    f"MODEL.PAN.CONNECTION 'identity' with FUSION 'add' needs stages as wide as "
                    f"the parts ({feat_dim}); {wrong} are not: use FUSION 'concat'"
                )
        self.nl = nn.ModuleDict(
            {
                s: NonLocal(channels[s], pc.NL_REDUCTION, pc.NL_SUBSAMPLE, cfg.MODEL.BACKBONE.NORM)
                for s in pc.NL_STAGES
            }
        )
        in_dim = feat_dim
        if self.fusion == "concat":
            in_dim += sum(channels[s] for s in stages)
        self.num_parts = self.parts.num_parts
        self.in_dim = in_dim
        embed = pc.EMBED_DIM
        self.embed_dim = embed
        self.embeddings = nn.ModuleList(
            nn.Conv2d(in_dim, embed, 1, bias=False) for _ in range(self.num_parts)
        )
        self.bnnecks = nn.ModuleList(
            (get_norm(cfg.MODEL.HEADS.NORM, embed, bias_freeze=True) if pc.BNNECK
             else nn.Identity())
            for _ in range(self.num_parts)
        )  # fmt: skip
        num_classes = cfg.MODEL.HEADS.NUM_CLASSES
        self.classifiers = nn.ModuleList(
            nn.Linear(embed, num_classes, bias=False) for _ in range(self.num_parts)
        )
        self.triplet_feat = pc.TRIPLET_FEAT
        self.test_feat = pc.TEST_FEAT
        for m in self.embeddings:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.bnnecks:
            if isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.classifiers:
            nn.init.normal_(m.weight, std=float(pc.CLS_INIT_STD))

    @property
    def out_dim(self):
        """int: test feature width, parts x EMBED_DIM (6 x 256 = 1536)."""
        return self.num_parts * self.embed_dim

    def fuse(self, feats):
        """Part features and PAM fusion.

        Args:
            feats (dict[str, Tensor] | Tensor): stage outputs with "layer4" [N, C, h, w] and
                every connected stage [N, C_l, H_l, W_l], or the layer4 map alone (none).
        Returns:
            tuple: e [N, K, in_dim] (float32), masks (list of [N, l, h*w]).
        """
        if isinstance(feats, torch.Tensor):
            if self.connected_stages:
                raise ValueError(
                    "PANHead got only the layer4 map but MODEL.PAN.PAM_STAGES="
                    f"{list(self.connected_stages)} needs stage outputs: use "
                    "MODEL.META_ARCHITECTURE PAN, or MODEL.PAN.PAM_STAGES [] in other models"
                )
            feats = {"layer4": feats}
        x4 = feats["layer4"]
        parts, masks = self.parts(x4)  # [N, K, C]
        if self.connection == "pam":
            zs = [self.pam[s](parts, feats[s]) for s in self.pam_stages]
        else:  # conv / identity: the (transformed) map pooled with the part masks
            zs = []
            for s in self.connected_stages:
                y = self.conv[s](feats[s]) if s in self.conv else feats[s]
                zs.append(self.parts.pool_map(self.resample[s](y), masks))
        if self.fusion == "concat":
            e = torch.cat([parts] + zs, dim=2)
        else:
            e = parts
            for z in zs:
                e = e + z
        return e, masks

    def forward(self, feats, targets=None):
        """Args:
            feats (dict[str, Tensor] | Tensor): see :meth:`fuse`.
            targets (Tensor | None): [N] identity labels (unused; fast-reid signature).
        Returns:
            Tensor [N, K*EMBED_DIM] in eval mode; in training a dict with ``part_logits``
            (list of K [N, num_classes]), ``triplet_features`` [N, K*EMBED_DIM], ``masks``
            (list per scale of [N, l, h*w]), and for fast-reid's Baseline ``cls_outputs`` /
            ``pred_class_logits`` (the first part) and ``features`` (= triplet_features).
        """
        e, masks = self.fuse(feats)
        e = e.to(self.embeddings[0].weight.dtype).unsqueeze(-1).unsqueeze(-1)  # [N, K, D, 1, 1]
        before, after = [], []
        for k in range(self.num_parts):
            emb = self.embeddings[k](e[:, k])  # [N, E, 1, 1]
            before.append(emb.flatten(1))
            after.append(self.bnnecks[k](emb).flatten(1))
        if not self.training:
            return torch.cat(after if self.test_feat == "after" else before, 1)
        logits = [cls(f) for cls, f in zip(self.classifiers, after)]
        tri = torch.cat(before if self.triplet_feat == "before" else after, 1)
        return {
            "part_logits": logits,
            "triplet_features": tri,
            "masks": masks,
            "cls_outputs": logits[0],
            "pred_class_logits": logits[0].detach(),
            "features": tri,
        }
