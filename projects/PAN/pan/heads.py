"""PAN's head: part extraction (PLM or stripes), PAM fusion and the per-part embeddings,
BNNecks and classifiers (§3, §4.1; docs/decisions/pan.md). Everything new lives here, so a model
that stores it as ``self.heads`` trains it at ``SOLVER.HEADS_LR_FACTOR`` (§4.1: 10x)."""

from fractions import Fraction

import torch
from fastreid.config import configurable
from fastreid.layers import get_norm
from torch import nn

from reidzoo.modeling.arguments import (
    ArgumentError,
    arguments_of,
    check_choice,
    config_keys,
    read_keys,
)
from reidzoo.modeling.backbone import STAGES
from reidzoo.registry import HEADS_REGISTRY

from .modules import PAM, PLM, ConvConnection, NonLocal, StripeParts, grid_resampler

CONNECTIONS = ("pam", "conv", "identity")
PARTS = ("plm", "stripes")
FUSIONS = ("concat", "add")
FEATS = ("before", "after")
CA_ACTS = ("sigmoid", "relu")
MASK_ACTS = ("relu", "softplus")
ORTH_MASKS = ("raw", "normalized")


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

    Built from a config (``PANHead(cfg)``, as fast-reid's ``build_heads`` calls it; see
    :meth:`from_config`) or from the keyword arguments below, e.g. inside a model of your own:
    ``PANHead(feat_dim=2048, num_classes=751)`` is the PAN_c head of our ResNet-50 configs.

    Args:
        feat_dim (int): channels C of X^4, the layer4 map (2048 for ResNet-50, 512 for
            ResNet-18); the earlier stages are C / 2^(4-l) wide (:func:`stage_widths`).
        num_classes (int): identities, the width of each part classifier.
        parts (str): part extractor: "plm" (learned parts, §3.2) or "stripes" (Table 1).
        scales (Sequence[int]): PLM granularities l; scale l learns l parts ((1, 2, 3): 6).
        num_stripes (int): number of horizontal stripes when ``parts`` is "stripes".
        sa_dim (int): hidden width of PLM's spatial attention.
        ca_reduction (int): reduction r of PLM's channel attention.
        ca_act (str): last activation of the channel attention: "sigmoid" or "relu".
        mask_act (str): last activation of PLM's masks: "relu" (the paper) or "softplus".
        connected_stages (Sequence[str]): stages X^l joined to the parts ("layer1".."layer4";
            empty: the PLM baseline of Table 2); ``forward`` then needs their outputs.
        connection (str): how Z^l is made from X^l: "pam" (Eq. 1-3), "conv" or "identity".
        pam_dims (Sequence[int]): PAM's inner dimension D, one per connected stage ("pam").
        pam_norm (str): fast-reid norm type on each PAM output Z^l ("" for none).
        conv_last_stride (int): stride, 1 or 2, of the last block of each "conv" cascade.
        last_stride (int): the backbone's layer4 stride, 1 or 2 (brings X^l to X^4's grid).
        fusion (str): "concat" (PAN_c) or "add" (PAN_a) of P_i and the Z^l_i.
        embed_dim (int): width of each part's embedding.
        bnneck (bool): a BNNeck (frozen bias) after each embedding.
        norm (str): fast-reid norm type of PLM, the conv cascades and the BNNecks.
        cls_init_std (float): std of the part classifiers' normal initialisation.
        triplet_feat (str): the triplet loss's feature, "before" or "after" the BNNecks.
        test_feat (str): the test feature, "before" or "after" the BNNecks.
        nl_stages (Sequence[str]): stages followed by a non-local block (Table 2 "NL").
        nl_reduction (int): non-local inter-channels C / ``nl_reduction``.
        nl_subsample (bool): 2x2 max-pooling of phi and g in the non-local blocks.
        nl_norm (str): norm type of the non-local blocks (the backbone's).
    Raises:
        reidzoo.modeling.arguments.ArgumentError: a wrong value, naming the argument(s)
            (built from a config: a ``ValueError`` naming the config keys).
    """

    #: argument -> config key, read by :meth:`from_config` (and named in its errors)
    CONFIG_KEYS = {
        "feat_dim": "MODEL.BACKBONE.FEAT_DIM",
        "num_classes": "MODEL.HEADS.NUM_CLASSES",
        "parts": "MODEL.PAN.PARTS",
        "scales": "MODEL.PAN.SCALES",
        "num_stripes": "MODEL.PAN.NUM_STRIPES",
        "sa_dim": "MODEL.PAN.SA_DIM",
        "ca_reduction": "MODEL.PAN.CA_REDUCTION",
        "ca_act": "MODEL.PAN.CA_ACT",
        "mask_act": "MODEL.PAN.MASK_ACT",
        "connected_stages": "MODEL.PAN.PAM_STAGES",
        "connection": "MODEL.PAN.CONNECTION",
        "pam_dims": "MODEL.PAN.PAM_DIMS",
        "pam_norm": "MODEL.PAN.PAM_NORM",
        "conv_last_stride": "MODEL.PAN.CONV_LAST_STRIDE",
        "last_stride": "MODEL.BACKBONE.LAST_STRIDE",
        "fusion": "MODEL.PAN.FUSION",
        "embed_dim": "MODEL.PAN.EMBED_DIM",
        "bnneck": "MODEL.PAN.BNNECK",
        "norm": "MODEL.HEADS.NORM",
        "cls_init_std": "MODEL.PAN.CLS_INIT_STD",
        "triplet_feat": "MODEL.PAN.TRIPLET_FEAT",
        "test_feat": "MODEL.PAN.TEST_FEAT",
        "nl_stages": "MODEL.PAN.NL_STAGES",
        "nl_reduction": "MODEL.PAN.NL_REDUCTION",
        "nl_subsample": "MODEL.PAN.NL_SUBSAMPLE",
        "nl_norm": "MODEL.BACKBONE.NORM",
    }

    @configurable
    def __init__(
        self,
        *,
        feat_dim,
        num_classes,
        parts="plm",
        scales=(1, 2, 3),
        num_stripes=6,
        sa_dim=256,
        ca_reduction=16,
        ca_act="sigmoid",
        mask_act="relu",
        connected_stages=("layer1", "layer2", "layer3"),
        connection="pam",
        pam_dims=(256, 256, 256),
        pam_norm="BN",
        conv_last_stride=2,
        last_stride=1,
        fusion="concat",
        embed_dim=256,
        bnneck=True,
        norm="BN",
        cls_init_std=0.001,
        triplet_feat="before",
        test_feat="after",
        nl_stages=(),
        nl_reduction=2,
        nl_subsample=True,
        nl_norm="BN",
    ):
        self.check_arguments(arguments_of(locals()))
        super().__init__()
        feat_dim = int(feat_dim)
        channels = stage_widths(feat_dim)
        if parts == "plm":
            self.parts = PLM(
                feat_dim, scales, int(sa_dim), int(ca_reduction), ca_act, norm, mask_act
            )
        else:
            self.parts = StripeParts(int(num_stripes))
        stages = tuple(connected_stages)
        self.fusion = fusion
        self.connection = connection
        # every stage whose output the head needs; pam_stages: the subset attended to by PAM
        self.connected_stages = stages
        self.pam_stages = stages if connection == "pam" else ()
        self.pam = nn.ModuleDict(
            {
                s: PAM(channels[s], feat_dim, int(d), channels[s] if fusion == "concat"
                       else feat_dim, norm=pam_norm)
                for s, d in zip(self.pam_stages, pam_dims)
            }
        )  # fmt: skip
        self.conv = nn.ModuleDict()
        # conv / identity: each connected map is brought to X^4's grid by a fixed resampling;
        # X^l's stride relative to X^4 is the product of the later stages' strides (2, 2, last)
        last_stride = int(last_stride)
        to_x4 = {"layer1": 4 * last_stride, "layer2": 2 * last_stride, "layer3": last_stride,
                 "layer4": 1}  # fmt: skip
        self.resample = nn.ModuleDict()
        last = STAGES.index("layer4")
        for s in stages if connection != "pam" else ():
            ratio = Fraction(1, to_x4[s])
            if connection == "conv":
                blocks = last - STAGES.index(s)  # >= 1: checked
                self.conv[s] = ConvConnection(
                    channels[s], blocks, widen=fusion == "add", stride=2,
                    last_stride=int(conv_last_stride), norm=norm,
                )  # fmt: skip
                ratio *= 2 ** (blocks - 1) * int(conv_last_stride)
            self.resample[s] = grid_resampler(ratio)
        self.nl = nn.ModuleDict(
            {s: NonLocal(channels[s], nl_reduction, nl_subsample, nl_norm) for s in nl_stages}
        )
        in_dim = feat_dim
        if fusion == "concat":
            in_dim += sum(channels[s] for s in stages)
        self.num_parts = self.parts.num_parts
        self.in_dim = in_dim
        embed = int(embed_dim)
        self.embed_dim = embed
        self.embeddings = nn.ModuleList(
            nn.Conv2d(in_dim, embed, 1, bias=False) for _ in range(self.num_parts)
        )
        self.bnnecks = nn.ModuleList(
            get_norm(norm, embed, bias_freeze=True) if bnneck else nn.Identity()
            for _ in range(self.num_parts)
        )
        self.classifiers = nn.ModuleList(
            nn.Linear(embed, int(num_classes), bias=False) for _ in range(self.num_parts)
        )
        self.triplet_feat = triplet_feat
        self.test_feat = test_feat
        for m in self.embeddings:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.bnnecks:
            if isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.classifiers:
            nn.init.normal_(m.weight, std=float(cls_init_std))

    @classmethod
    def from_config(cls, cfg):
        """Constructor arguments from a config: the keys of :attr:`CONFIG_KEYS`, checked.

        Args:
            cfg (CfgNode): uses ``MODEL.PAN``, ``MODEL.BACKBONE.FEAT_DIM``/``LAST_STRIDE``/
                ``NORM``, ``MODEL.HEADS.NUM_CLASSES``/``NORM``.
        Returns:
            dict: keyword arguments of ``__init__``.
        Raises:
            ValueError: a wrong value, naming its key(s); ``MODEL.PAN.ORTH_MASKS`` (read by
                the ``PAN`` model's loss) is checked here too.
        """
        args = read_keys(cfg, cls.CONFIG_KEYS)
        with config_keys({**cls.CONFIG_KEYS, "orth_masks": "MODEL.PAN.ORTH_MASKS"}):
            check_choice("PANHead", "orth_masks", cfg.MODEL.PAN.ORTH_MASKS, ORTH_MASKS)
            cls.check_arguments(args)
        return args

    @staticmethod
    def check_arguments(args):
        """Check the constructor's arguments together (both construction paths run it).

        Args:
            args (dict): every argument of ``__init__``, by name.
        Raises:
            reidzoo.modeling.arguments.ArgumentError: naming the argument(s) at fault.
        """
        own = "PANHead"
        for name, allowed in (
            ("parts", PARTS),
            ("ca_act", CA_ACTS),
            ("mask_act", MASK_ACTS),
            ("connection", CONNECTIONS),
            ("fusion", FUSIONS),
            ("triplet_feat", FEATS),
            ("test_feat", FEATS),
            ("conv_last_stride", (1, 2)),
            ("last_stride", (1, 2)),
        ):
            check_choice(own, name, args[name], allowed)
        feat_dim = args["feat_dim"]
        if not isinstance(feat_dim, int) or feat_dim < 8 or feat_dim % 8:
            raise ArgumentError(
                own, {"feat_dim": feat_dim}, "expected a positive multiple of 8 (layer4's width)"
            )
        for name, low in (("num_classes", 0), ("embed_dim", 1), ("num_stripes", 1),
                          ("sa_dim", 1), ("ca_reduction", 1), ("nl_reduction", 1)):  # fmt: skip
            if not isinstance(args[name], int) or args[name] < low:
                raise ArgumentError(own, {name: args[name]}, f"expected an integer >= {low}")
        scales = args["scales"]
        if not scales or any(not isinstance(s, int) or s < 1 for s in scales):
            raise ArgumentError(own, {"scales": scales}, "expected positive integers")
        stages = list(args["connected_stages"])
        for name in ("connected_stages", "nl_stages"):
            value = args[name]
            if any(s not in STAGES for s in value) or len(set(value)) != len(value):
                raise ArgumentError(own, {name: value}, f"expected distinct stages of {STAGES}")
        connection, fusion = args["connection"], args["fusion"]
        if connection == "pam" and stages and len(args["pam_dims"]) != len(stages):
            raise ArgumentError(
                own,
                {"pam_dims": args["pam_dims"], "connected_stages": args["connected_stages"]},
                "{pam_dims} needs one D per stage of {connected_stages}",
            )
        if connection == "conv" and "layer4" in stages:
            raise ArgumentError(
                own,
                {"connected_stages": args["connected_stages"], "connection": connection},
                "with {connection} 'conv' only stages before layer4 can be connected (one "
                "conv block per later stage)",
            )
        widths = stage_widths(feat_dim)
        wrong = [s for s in stages if widths[s] != feat_dim]
        if connection == "identity" and fusion == "add" and wrong:
            raise ArgumentError(
                own,
                {
                    "connection": connection,
                    "fusion": fusion,
                    "connected_stages": args["connected_stages"],
                },
                f"{{connection}} 'identity' with {{fusion}} 'add' needs stages as wide as the "
                f"parts ({feat_dim}); {wrong} are not: use {{fusion}} 'concat'",
            )

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
