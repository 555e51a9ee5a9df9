"""PFE's building blocks: TSAM (FAB then SEB, §IV-C) and MFA side branches (§IV-B).

* :class:`FAB`, :class:`SEB`, :class:`TSAM` (Eq. 14, Fig. 6); ``PFETSAM`` in
  ``STAGE_MODULE_REGISTRY`` inserts a TSAM after any ResNet stage of any fast-reid model
  (``MODEL.BACKBONE.INSERTS: ["layer2:PFETSAM"]``), switched by ``MODEL.PFE.TSAM_MODE``.
* :func:`activation_map`, :func:`top_alpha_mask` (Eq. 12, static k), :func:`resize_to`,
  :class:`MFA` (Eq. 10, 11, 13): the top-down masked feature propagation and the side features.
"""

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
from reidzoo.registry import STAGE_MODULE_REGISTRY

TSAM_MODES = ("tsam", "fab", "seb")
PROPAGATIONS = ("mfa", "fa", "none")


def _init_gate(layer, bias):
    """Kaiming init for the weight, constant ``bias`` for the last layer before a sigmoid."""
    nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    nn.init.constant_(layer.bias, bias)


class FAB(nn.Module):
    """Fully attentional block (Mancs; PFE Fig. 6b): a per-pixel, per-channel sigmoid mask
    from Conv1x1(C -> C/r) -> ReLU -> Conv1x1(C/r -> C), no pooling; returns M_FAB(F) * F.

    Args:
        channels (int): C.
        reduction (int): r (16).
        init_bias (float): initial bias of the last conv (sigmoid(bias) at start).
    """

    def __init__(self, channels, reduction=16, init_bias=0.0):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        _init_gate(self.fc1, 0.0)
        _init_gate(self.fc2, init_bias)

    def mask(self, x):
        """Args:
            x (Tensor): [N, C, H, W].
        Returns:
            Tensor: M_FAB [N, C, H, W] in (0, 1)."""
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x))))

    def forward(self, x):
        """Args:
            x (Tensor): [N, C, H, W].
        Returns:
            Tensor: [N, C, H, W]."""
        return self.mask(x) * x


class SEB(nn.Module):
    """Squeeze-and-excitation block (PFE Fig. 6a): GAP -> FC(C -> C/r) -> ReLU ->
    FC(C/r -> C) -> sigmoid, a channel mask broadcast over H x W; returns M_SEB(F) * F.

    Args:
        channels (int): C.
        reduction (int): r (16).
        init_bias (float): initial bias of the last FC.
    """

    def __init__(self, channels, reduction=16, init_bias=0.0):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        _init_gate(self.fc1, 0.0)
        _init_gate(self.fc2, init_bias)

    def mask(self, x):
        """Args:
            x (Tensor): [N, C, H, W].
        Returns:
            Tensor: M_SEB [N, C, 1, 1] in (0, 1)."""
        z = x.mean(dim=(2, 3))
        return torch.sigmoid(self.fc2(F.relu(self.fc1(z))))[:, :, None, None]

    def forward(self, x):
        """Args:
            x (Tensor): [N, C, H, W].
        Returns:
            Tensor: [N, C, H, W]."""
        return self.mask(x) * x


class TSAM(nn.Module):
    """Two-stage attention module (Eq. 14): F' = M_FAB(F) * F, F'' = M_SEB(F') * F'.

    A plain multiplicative block (no residual), as in Fig. 6c. Built from explicit arguments
    (``TSAM(1024)`` after a ResNet-50 layer3, in a model of your own) or from a config,
    ``TSAM(cfg, channels)`` (see :meth:`from_config`; how ``MODEL.BACKBONE.INSERTS:
    ["layer3:PFETSAM"]`` builds it).

    Args:
        channels (int): C, the channels of the map it follows.
        mode (str): "tsam" (FAB then SEB), "fab" or "seb" alone (Table I).
        reduction (int): r (FAB's and SEB's hidden width is C / r).
        init_bias (float): initial bias before each sigmoid.
    Raises:
        reidzoo.modeling.arguments.ArgumentError: a wrong value, naming the argument (built
            from a config: a ``ValueError`` naming the config key).
    """

    #: argument -> config key read by :meth:`from_config`
    CONFIG_KEYS = {
        "mode": "MODEL.PFE.TSAM_MODE",
        "reduction": "MODEL.PFE.TSAM_REDUCTION",
        "init_bias": "MODEL.PFE.TSAM_INIT_BIAS",
    }

    @configurable
    def __init__(self, channels, mode="tsam", reduction=16, init_bias=0.0):
        self.check_arguments(arguments_of(locals()))
        super().__init__()
        reduction, init_bias = int(reduction), float(init_bias)
        self.mode = mode
        self.fab = FAB(channels, reduction, init_bias) if mode in ("tsam", "fab") else None
        self.seb = SEB(channels, reduction, init_bias) if mode in ("tsam", "seb") else None

    def forward(self, x):
        """Args:
            x (Tensor): [N, C, H, W].
        Returns:
            Tensor: [N, C, H, W]."""
        if self.fab is not None:
            x = self.fab(x)
        if self.seb is not None:
            x = self.seb(x)
        return x

    @classmethod
    def from_config(cls, cfg, channels):
        """Constructor arguments from ``cfg.MODEL.PFE`` (the keys of :attr:`CONFIG_KEYS`).

        Args:
            cfg (CfgNode): root config.
            channels (int): the channels of the map the block follows.
        Returns:
            dict: keyword arguments of ``__init__``.
        Raises:
            ValueError: a wrong value, naming its key.
        """
        return arguments_from_config(cfg, cls.CONFIG_KEYS, cls.check_arguments, channels=channels)

    @staticmethod
    def check_arguments(args):
        """Check the constructor's arguments (both construction paths run it).

        Args:
            args (dict): every argument of ``__init__``, by name.
        Raises:
            reidzoo.modeling.arguments.ArgumentError: naming the argument at fault.
        """
        check_choice("TSAM", "mode", args["mode"], TSAM_MODES)
        for name in ("channels", "reduction"):
            if not isinstance(args[name], int) or args[name] < 1:
                raise ArgumentError("TSAM", {name: args[name]}, "expected an integer >= 1")
        if not isinstance(args["init_bias"], (int, float)):
            raise ArgumentError("TSAM", {"init_bias": args["init_bias"]}, "expected a number")


@STAGE_MODULE_REGISTRY.register()
def PFETSAM(cfg, stage, channels):
    """Stage module: a :class:`TSAM` after ``stage`` (``MODEL.BACKBONE.INSERTS``).

    Args:
        cfg (CfgNode): uses ``MODEL.PFE.TSAM_MODE/TSAM_REDUCTION/TSAM_INIT_BIAS``.
        stage (str): "layer1".."layer4" (unused: the same block everywhere).
        channels (int): the stage's output channels.
    Returns:
        TSAM
    """
    return TSAM(cfg, channels)


# ------------------------------------------------------------------------------ MFA (§IV-B)


def activation_map(t, eps=1e-6):
    """A_s: sum of absolute values over channels, min-max normalised per sample to [0, 1]
    (§IV-B; the normalisation: docs/decisions/pfe.md#activation-normalisation).

    Args:
        t (Tensor): T_s [N, C, H, W].
        eps (float): added to the range (a constant map gives zeros).
    Returns:
        Tensor: [N, H, W].
    """
    a = t.abs().sum(dim=1)
    flat = a.flatten(1)
    lo = flat.min(dim=1).values[:, None, None]
    hi = flat.max(dim=1).values[:, None, None]
    return (a - lo) / (hi - lo + eps)


def mask_count(height, width, alpha):
    """k = ceil(alpha * H * W), at least 1 (Eq. 12's "top alpha%"); a Python int.

    Args:
        height (int), width (int), alpha (float).
    Returns:
        int
    """
    return max(1, min(height * width, math.ceil(alpha * height * width - 1e-9)))


def top_alpha_mask(a, alpha):
    """M_s of Eq. 12: 0 at the k = ceil(alpha * H * W) largest positions of A_s, 1 elsewhere.

    k is static (from the map's size), so the graph exports as ONNX TopK + ScatterElements.
    Exactly k positions are zeroed per sample (ties broken by TopK; with thsh = the k-th
    largest value, Eq. 12 would zero every tied position). Not differentiable (constant).

    Args:
        a (Tensor): A_s [N, H, W].
        alpha (float): fraction in (0, 1].
    Returns:
        Tensor: [N, 1, H, W] of 0./1. in ``a``'s dtype.
    """
    n, h, w = a.shape
    k = mask_count(int(h), int(w), float(alpha))
    flat = a.detach().flatten(1)
    idx = flat.topk(k, dim=1).indices
    ones = torch.ones_like(flat)
    mask = ones.scatter(1, idx, torch.zeros_like(idx, dtype=flat.dtype))
    return mask.view(-1, 1, h, w)


def resize_to(x, target):
    """Upsample of Eq. 10, 13: bilinear resize of ``x`` to ``target``'s spatial size (the
    identity when the sizes agree, e.g. layer4 -> layer3 at last stride 1).

    Args:
        x (Tensor): [N, C, h, w].
        target (Tensor): [N, *, H, W].
    Returns:
        Tensor: [N, C, H, W].
    """
    if tuple(x.shape[-2:]) == tuple(target.shape[-2:]):
        return x
    return F.interpolate(x, size=target.shape[-2:], mode="bilinear", align_corners=False)


def side_conv(channels, dim, separable=False):
    """CONV of Eq. 11: Conv3x3(C -> C) + BN + ReLU, then Conv1x1(C -> dim) + BN + ReLU.
    ``separable`` uses depthwise 3x3 + pointwise C -> C for the first (Table V's dagger).

    Returns:
        nn.Sequential: [N, C, H, W] -> [N, dim, H, W].
    """
    if separable:
        first = [
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            nn.Conv2d(channels, channels, 1, bias=False),
        ]
    else:
        first = [nn.Conv2d(channels, channels, 3, padding=1, bias=False)]
    layers = first + [
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, dim, 1, bias=False),
        nn.BatchNorm2d(dim),
        nn.ReLU(inplace=True),
    ]
    seq = nn.Sequential(*layers)
    for m in seq.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return seq


class MFA(nn.Module):
    """The side branches of PFE with masked feature augmentation (Eq. 10-13, Fig. 4).

    T_s = Conv1x1(X_s -> C) for every used stage (the last one is the top layer S, feeding
    Psi_S = T_S * M_S). From the top down, for each side s:
    ``T_hat_s = T_s + Up(Psi_{s+1})`` (Eq. 10), ``Psi_s = T_s * M_s + Up(Psi_{s+1})``
    (Eq. 13), ``F_s = GAP(CONV(T_hat_s))`` (Eq. 11).

    Args:
        in_channels (list[int]): channels of X_2, ..., X_S (stage outputs, top last).
        channels (int): C.
        dim (int): side feature size (512).
        alpha (float): Eq. 12.
        propagation (str): "mfa", "fa" (M_s = 1) or "none" (T_hat_s = T_s).
        separable (bool): depthwise-separable 3x3 in CONV.
    """

    def __init__(self, in_channels, channels, dim, alpha=0.05, propagation="mfa",
                 separable=False):  # fmt: skip
        super().__init__()
        if propagation not in PROPAGATIONS:
            raise ValueError(
                f"MODEL.PFE.PROPAGATION={propagation!r}; expected one of {PROPAGATIONS}"
            )
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"MODEL.PFE.ALPHA={alpha}; expected 0 < alpha <= 1")
        self.alpha = float(alpha)
        self.propagation = propagation
        self.reduce = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        for conv in self.reduce:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        self.convs = nn.ModuleList(
            side_conv(channels, dim, separable) for _ in range(len(in_channels) - 1)
        )

    def forward(self, maps):
        """Args:
            maps (list[Tensor]): X_2, ..., X_S, each [N, C_s, H_s, W_s] (top last).
        Returns:
            tuple: ``feats`` (list[Tensor], F_2..F_{S-1}, each [N, dim]), ``acts``
            (list[Tensor], A_2..A_S, each [N, H_s, W_s]), ``masks`` (list[Tensor], M_2..M_S,
            each [N, 1, H_s, W_s]).
        """
        ts = [conv(x) for conv, x in zip(self.reduce, maps)]
        acts = [activation_map(t) for t in ts]
        masks = [top_alpha_mask(a, self.alpha) for a in acts]
        feats = [None] * len(self.convs)
        psi = self._keep(ts[-1], masks[-1])  # Psi_S = T_S * M_S
        for i in range(len(self.convs) - 1, -1, -1):
            t = ts[i]
            if self.propagation == "none":
                t_hat = t
            else:
                up = resize_to(psi, t)
                t_hat = t + up  # Eq. 10
                psi = self._keep(t, masks[i]) + up  # Eq. 13
            feats[i] = self.convs[i](t_hat).mean(dim=(2, 3))  # Eq. 11
        return feats, acts, masks

    def _keep(self, t, mask):
        """T_s * M_s (MFA) or T_s (FA)."""
        return t * mask if self.propagation == "mfa" else t
