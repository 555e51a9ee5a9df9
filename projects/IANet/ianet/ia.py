"""Spatial and channel interaction-and-aggregation blocks (IANet §3, Eq. 1-9)."""

import math

import torch
import torch.nn.functional as F
from fastreid.config import configurable
from torch import nn

from reidzoo.modeling.arguments import (
    ArgumentError,
    arguments_from_config,
    arguments_of,
    check_choice,
)
from reidzoo.modeling.backbone import STAGES
from reidzoo.registry import STAGE_MODULE_REGISTRY

from .fused import (
    context_range,
    fused_channel_aggregation,
    fused_context_logits,
    fused_enabled,
    fused_prod_relation,
)

FUSIONS = ("prod", "sum", "max")
NORMS = ("softmax", "renorm")
RELATIONS = ("semantic", "appearance", "location")
ARRANGEMENTS = ("spatial_channel", "channel_spatial", "parallel", "spatial", "channel")


def context_offsets(k):
    """Offsets of a K x K context patch around a position, as (dy, dx) pairs.

    Odd K is centred; even K is anchored top-left (K = 2 -> {0, 1}^2).

    Args:
        k (int): patch size, >= 1.
    Returns:
        list[tuple[int, int]]
    """
    lo, hi = context_range(k)
    return [(dy, dx) for dy in range(lo, hi + 1) for dx in range(lo, hi + 1)]


def context_logits(dots, h, w, contexts):
    """Multi-context appearance logits from the one position-by-position dot-product map.

    ``logit_K[i, j] = sum_{(dy, dx) in Omega_K} dots[i + (dy, dx), j + (dy, dx)]`` with zero
    outside the map: the dot products of zero-padded K x K patches (Eq. 1), obtained by
    shifting and summing ``dots`` instead of new C-dimensional products (§4.3).

    Args:
        dots (Tensor): [N, M, M] with ``dots[n, i, j] = f_i . f_j``, M = h * w (row-major).
        h, w (int): map size.
        contexts (Sequence[int]): patch sizes K.
    Returns:
        list[Tensor]: one [N, M, M] logit map per K.
    """
    n, m = dots.shape[0], h * w
    offsets = {k: context_offsets(k) for k in contexts}
    pad = max(max(abs(dy), abs(dx)) for offs in offsets.values() for dy, dx in offs)
    d5 = dots.reshape(n, h, w, h, w)
    if pad:
        d5 = F.pad(d5, (pad, pad, pad, pad, pad, pad, pad, pad))

    def shifted(dy, dx):
        ys, xs = pad + dy, pad + dx
        return d5[:, ys : ys + h, xs : xs + w, ys : ys + h, xs : xs + w]

    # Contexts are nested (Omega_1 in Omega_2 in Omega_3): each sum starts from the largest
    # one already computed that it contains, so every shifted map is added once.
    done = {}
    for k in sorted(set(contexts), key=lambda k: len(offsets[k])):
        want = frozenset(offsets[k])
        base = max((s for s in done if s <= want), key=len, default=frozenset())
        acc = done[base] if base else None
        for dy, dx in offsets[k]:
            if (dy, dx) not in base:
                part = shifted(dy, dx)
                acc = part if acc is None else acc + part
        done[want] = acc
    return [done[frozenset(offsets[k])].reshape(n, m, m) for k in contexts]


def location_logits(h, w, sigma_x, sigma_y, device=None):
    """Logits ``-d_ij`` of the 2-D Gaussian location relations (Eq. 3 exponent).

    Args:
        h, w (int): map size; positions are row-major, x along the width, y along the height.
        sigma_x, sigma_y (float): sigma_1 and sigma_2 of Eq. 3.
    Returns:
        Tensor: [M, M] fp32, ``-(x_j - x_i)^2 / (2 s1^2) - (y_j - y_i)^2 / (2 s2^2)``.
    """
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=device),
        torch.arange(w, dtype=torch.float32, device=device),
        indexing="ij",
    )
    x, y = xs.reshape(-1), ys.reshape(-1)
    d = (x[None, :] - x[:, None]) ** 2 / (2 * sigma_x**2) + (y[None, :] - y[:, None]) ** 2 / (
        2 * sigma_y**2
    )
    return -d


def location_relation(h, w, sigma_x, sigma_y, device=None):
    """Row-normalised 2-D Gaussian location relations S^L (Eq. 3-4).

    Args:
        h, w (int): map size; positions are row-major, x along the width, y along the height.
        sigma_x, sigma_y (float): sigma_1 and sigma_2 of Eq. 3.
    Returns:
        Tensor: [M, M], rows sum to 1.
    """
    # the 1 / (2 pi s1 s2) factor cancels in Eq. 4
    return torch.softmax(location_logits(h, w, sigma_x, sigma_y, device), dim=1)


def _fuse(maps, fusion):
    if fusion == "prod":
        out = maps[0]
        for m in maps[1:]:
            out = out * m
        return out
    if fusion == "sum":
        out = maps[0]
        for m in maps[1:]:
            out = out + m
        return out
    if fusion == "max":  # amax, not chained maximum: ties share the gradient equally
        return torch.stack(torch.broadcast_tensors(*maps)).amax(0)
    raise ValueError(f"MODEL.IANET.FUSION={fusion!r}; expected one of {FUSIONS}")


def _normalise(x, norm):
    if norm == "softmax":
        return torch.softmax(x, dim=-1)
    if norm == "renorm":
        return x / x.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    raise ValueError(f"MODEL.IANET.FUSION_NORM={norm!r}; expected one of {NORMS}")


def check_sia_arguments(owner, args):
    """Check the arguments of :class:`SIA` (also run by :class:`IABlock`).

    Args:
        owner (str): the component named in the error ("SIA", "IABlock").
        args (dict): ``contexts``, ``fusion``, ``norm``, ``relation``, ``sigma`` by name.
    Raises:
        reidzoo.modeling.arguments.ArgumentError: naming the argument at fault.
    """
    check_choice(owner, "relation", args["relation"], RELATIONS)
    check_choice(owner, "fusion", args["fusion"], FUSIONS)
    check_choice(owner, "norm", args["norm"], NORMS)
    contexts = args["contexts"]
    if not contexts or any(not isinstance(k, int) or k < 1 for k in contexts):
        raise ArgumentError(owner, {"contexts": contexts}, "expected patch sizes K >= 1")
    sigma = args["sigma"]
    if len(sigma) != 2 or any(not isinstance(v, (int, float)) or v <= 0 for v in sigma):
        raise ArgumentError(owner, {"sigma": sigma}, "expected (sigma_1, sigma_2), both > 0")


def _zero_bn(channels):
    bn = nn.BatchNorm2d(channels)
    nn.init.zeros_(bn.weight)  # Y = BN(E) + F is the identity at insertion (§3.3)
    nn.init.zeros_(bn.bias)
    return bn


class SIA(nn.Module):
    """Spatial interaction-and-aggregation module: E^S = F S^T (Eq. 1-6), without the residual.

    Args:
        channels (int): C.
        contexts (Sequence[int]): patch sizes K (Eq. 1-2).
        fusion (str): "prod", "sum" or "max" (Eq. 2, 5).
        norm (str): "softmax" (paper) or "renorm" after fusion.
        scale (bool): divide appearance logits by sqrt(C).
        relation (str): "semantic", "appearance" or "location".
        sigma (tuple[float, float]): (sigma_1 along x, sigma_2 along y) of Eq. 3.
        fused (bool): compute with the Functions of :mod:`.fused` (own buffers reused in
            place, hand-written backward): :func:`fused_prod_relation` for product fusion
            (with "renorm", one softmax of the summed logits), else
            :func:`fused_context_logits`. Same maths as the composed path, which tracing and
            ONNX export always take.
    """

    def __init__(
        self,
        channels,
        contexts=(1, 2, 3),
        fusion="prod",
        norm="softmax",
        scale=True,
        relation="semantic",
        sigma=(5.0, 10.0),
        fused=True,
    ):
        check_sia_arguments("SIA", arguments_of(locals()))
        super().__init__()
        self.channels = channels
        self.contexts = tuple(int(k) for k in contexts)
        self.fusion, self.norm, self.scale, self.relation = fusion, norm, scale, relation
        self.sigma = (float(sigma[0]), float(sigma[1]))
        self.fused = bool(fused)
        self._location_cache = {}

    def _location_pair(self, h, w, device):
        key = (h, w, str(device))
        if key not in self._location_cache:
            logits = location_logits(h, w, *self.sigma, device=device)
            self._location_cache[key] = (logits, torch.softmax(logits, dim=1))
        return self._location_cache[key]

    def location(self, h, w, device):
        """S^L for an h x w map, built once per size and device: [M, M]."""
        return self._location_pair(h, w, device)[1]

    def relation_map(self, x):
        """The relation map SIA aggregates with, in fp32.

        Args:
            x (Tensor): F, [N, C, H, W].
        Returns:
            Tensor: [N, M, M], rows sum to 1.
        """
        n, c, h, w = x.shape
        f = x.float().reshape(n, c, h * w)
        if self.relation == "location":
            return self.location(h, w, x.device).expand(n, -1, -1)
        if self._fused_prod():
            return self._fused_prod_relation(f, h, w, aggregate=False)
        div = math.sqrt(c) if self.scale else None
        if fused_enabled(self.fused):
            logits = fused_context_logits(f, h, w, self.contexts, div)
        else:
            dots = torch.bmm(f.transpose(1, 2), f)
            logits = context_logits(dots if div is None else dots / div, h, w, self.contexts)
        per_k = [torch.softmax(z, dim=-1) for z in logits]
        # One context: S^A = S_K^A (Tab. 4a); several: Eq. 2.
        s_a = per_k[0] if len(per_k) == 1 else _normalise(_fuse(per_k, self.fusion), self.norm)
        if self.relation == "appearance":
            return s_a
        return _normalise(_fuse([s_a, self.location(h, w, x.device)], self.fusion), self.norm)

    def _fused_prod(self):
        return self.fusion == "prod" and self.relation != "location" and fused_enabled(self.fused)

    def _fused_prod_relation(self, f, h, w, aggregate):
        loc = None
        if self.relation == "semantic":
            # renorm: S = softmax(sum_K logit_K - d), see fused_prod_relation
            loc = self._location_pair(h, w, f.device)[0 if self.norm == "renorm" else 1]
        div = math.sqrt(f.shape[1]) if self.scale else None
        return fused_prod_relation(f, h, w, self.contexts, div, self.norm, loc, aggregate)

    def forward(self, x):
        """Args:
            x (Tensor): F, [N, C, H, W].
        Returns:
            Tensor: E^S, [N, C, H, W] in x's dtype."""
        n, c, h, w = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            f = x.float().reshape(n, c, h * w)
            if self._fused_prod():
                e, _ = self._fused_prod_relation(f, h, w, aggregate=True)
            else:
                e = torch.bmm(f, self.relation_map(x).transpose(1, 2))
        return e.reshape(n, c, h, w).to(x.dtype)


class CIA(nn.Module):
    """Channel interaction-and-aggregation module: E^C = softmax(F F^T) F (Eq. 7-8).

    Args:
        fused (bool): use :func:`fused_channel_aggregation` (in-place softmax, hand-written
            backward); same maths as the composed path, which tracing and ONNX export take.
    """

    def __init__(self, fused=True):
        super().__init__()
        self.fused = bool(fused)

    def relation_map(self, x):
        """Args:
            x (Tensor): [N, C, H, W].
        Returns:
            Tensor: [N, C, C] channel relations in fp32, rows sum to 1."""
        n, c, h, w = x.shape
        f = x.float().reshape(n, c, h * w)
        return torch.softmax(torch.bmm(f, f.transpose(1, 2)), dim=-1)  # unscaled, as Eq. 7

    def forward(self, x):
        """Args:
            x (Tensor): F, [N, C, H, W].
        Returns:
            Tensor: E^C, [N, C, H, W] in x's dtype."""
        n, c, h, w = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            f = x.float().reshape(n, c, h * w)
            if fused_enabled(self.fused):
                e = fused_channel_aggregation(f)
            else:
                e = torch.bmm(self.relation_map(x), f)
        return e.reshape(n, c, h, w).to(x.dtype)


class ResidualIA(nn.Module):
    """``Y = BN(E) + F`` (Eq. 9) around an SIA or CIA module; BN starts at zero.

    Args:
        module (nn.Module): SIA or CIA.
        channels (int): C.
    """

    def __init__(self, module, channels):
        super().__init__()
        self.module = module
        self.bn = _zero_bn(channels)

    def forward(self, x):
        return self.bn(self.module(x)) + x


class IABlock(nn.Module):
    """IA block: SIA and CIA blocks arranged as in Tab. 4d.

    Built from explicit arguments (``IABlock(1024, sigma=(5.0, 10.0))`` after a ResNet-50
    layer3, in a model of your own) or from a config, ``IABlock(cfg, stage, channels)`` (see
    :meth:`from_config`; how ``MODEL.BACKBONE.INSERTS: ["layer3:IANetIABlock"]`` builds it).

    Args:
        channels (int): C, the channels of the map it follows.
        arrangement (str): "spatial_channel" (default), "channel_spatial", "parallel"
            (Y = F + BN_S(E^S) + BN_C(E^C)), "spatial" or "channel" (one block only).
        fused (bool): the ``fused`` switch of both :class:`SIA` and :class:`CIA`.
        contexts (Sequence[int]): SIA's patch sizes K (Eq. 1-2).
        fusion (str): SIA's fusion, "prod", "sum" or "max" (Eq. 2, 5).
        norm (str): SIA's normalisation after fusion, "softmax" (paper) or "renorm".
        scale (bool): divide SIA's appearance logits by sqrt(C).
        relation (str): SIA's relation map, "semantic", "appearance" or "location".
        sigma (tuple[float, float]): (sigma_1 along x, sigma_2 along y) of Eq. 3; the paper
            uses (10, 20) after layer2 and (5, 10) after layer3.
    Raises:
        reidzoo.modeling.arguments.ArgumentError: a wrong value, naming the argument (built
            from a config: a ``ValueError`` naming the config key).
    """

    #: argument -> config key read by :meth:`from_config` (``sigma``: ``SIGMA_<STAGE>``)
    CONFIG_KEYS = {
        "arrangement": "MODEL.IANET.ARRANGEMENT",
        "contexts": "MODEL.IANET.CONTEXTS",
        "fusion": "MODEL.IANET.FUSION",
        "norm": "MODEL.IANET.FUSION_NORM",
        "scale": "MODEL.IANET.SCALE",
        "relation": "MODEL.IANET.RELATION",
    }

    @configurable
    def __init__(
        self,
        channels,
        arrangement="spatial_channel",
        fused=True,
        contexts=(1, 2, 3),
        fusion="prod",
        norm="softmax",
        scale=True,
        relation="semantic",
        sigma=(5.0, 10.0),
    ):
        self.check_arguments(arguments_of(locals()))
        super().__init__()
        self.arrangement = arrangement
        if arrangement != "channel":
            sia = SIA(channels, contexts, fusion, norm, scale, relation, sigma, fused=fused)
            self.sia = ResidualIA(sia, channels)
        else:
            self.sia = None
        self.cia = ResidualIA(CIA(fused=fused), channels) if arrangement != "spatial" else None

    @classmethod
    def from_config(cls, cfg, stage, channels):
        """Constructor arguments from ``cfg.MODEL.IANET`` for a block after ``stage``.

        Args:
            cfg (CfgNode): root config.
            stage (str): "layer1".."layer4", the stage the block follows (selects
                ``SIGMA_<STAGE>``).
            channels (int): that stage's output channels.
        Returns:
            dict: keyword arguments of ``__init__``.
        Raises:
            ValueError: a wrong value, naming its key (or ``stage``).
        """
        if stage not in STAGES:
            raise ValueError(f"IABlock.from_config: stage={stage!r}; expected one of {STAGES}")
        keys = {**cls.CONFIG_KEYS, "sigma": f"MODEL.IANET.SIGMA_{stage.upper()}"}
        args = arguments_from_config(cfg, keys, cls.check_arguments, channels=channels, fused=True)
        args.pop("fused")  # checked as the fused block it builds, not an argument
        return args

    @staticmethod
    def check_arguments(args):
        """Check the constructor's arguments (both construction paths run it).

        Args:
            args (dict): every argument of ``__init__``, by name.
        Raises:
            reidzoo.modeling.arguments.ArgumentError: naming the argument at fault.
        """
        if not isinstance(args["channels"], int) or args["channels"] < 1:
            raise ArgumentError("IABlock", {"channels": args["channels"]}, "expected an int >= 1")
        check_choice("IABlock", "arrangement", args["arrangement"], ARRANGEMENTS)
        check_sia_arguments("IABlock", args)

    def forward(self, x):
        """Args:
            x (Tensor): [N, C, H, W].
        Returns:
            Tensor: [N, C, H, W]."""
        if self.arrangement == "spatial":
            return self.sia(x)
        if self.arrangement == "channel":
            return self.cia(x)
        if self.arrangement == "spatial_channel":
            return self.cia(self.sia(x))
        if self.arrangement == "channel_spatial":
            return self.sia(self.cia(x))
        # parallel: both modules read F; one residual
        return x + self.sia.bn(self.sia.module(x)) + self.cia.bn(self.cia.module(x))


def ia_block_from_config(cfg, stage, channels):
    """Build an :class:`IABlock` for the output of ``stage`` from ``cfg.MODEL.IANET``: the
    same as ``IABlock(cfg, stage, channels)``.

    Args:
        cfg (CfgNode)
        stage (str): "layer1".."layer4" (selects the Gaussian sigmas).
        channels (int): the stage's output channels.
    Returns:
        IABlock
    """
    return IABlock(cfg, stage, channels)


@STAGE_MODULE_REGISTRY.register()
def IANetIABlock(cfg, stage, channels):  # noqa: N802 (registry name)
    """Registered stage module: ``MODEL.BACKBONE.INSERTS: ["layer2:IANetIABlock", ...]``."""
    return IABlock(cfg, stage, channels)
