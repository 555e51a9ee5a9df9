"""RMGL building blocks: receptive partition (RP, §III-B) and activation-balanced pooling
(ABP, §III-C, Eq. 8-11), plus a receptive-field walker for the paper's "363" (§III-B).

Everything here is export-friendly: no Python control flow on tensor values, no ``.item()``,
no tensor-valued slicing, and the batch axis is only ever reshaped with ``-1``.
"""

import torch
from fastreid.config import configurable
from torch import nn

from reidzoo.modeling.arguments import (
    ArgumentError,
    arguments_from_config,
    arguments_of,
    check_choice,
)

POOLS = ("max", "avg")
#: How ABP counts a channel whose spatial maximum is tied (:func:`channel_peaks`).
TIES = ("strict", "first")


def check_partition(height, parts, stride):
    """Raise a clear error unless ``height`` can be cut into ``parts`` aligned stripes.

    Every stripe of the input must map onto a whole number of rows of the final map, i.e.
    ``height`` must be divisible by ``parts * stride`` (K = 3 needs 384,
    not 256: docs/decisions/rmgl.md#input-height).

    Args:
        height (int): input image height H.
        parts (int): stripe number n_s (K).
        stride (int): total stride of the network from the input to the final map (16).
    Raises:
        ValueError: when it does not divide.
    """
    if height % (parts * stride) != 0:
        raise ValueError(
            f"RMGL: input height {height} is not divisible by {parts} stripes x total stride "
            f"{stride} = {parts * stride}; receptive partition and stripe pooling need "
            f"aligned stripes (use e.g. INPUT.SIZE_TRAIN/SIZE_TEST [384, 128], or change "
            f"MODEL.RMGL.GRANULARITIES)"
        )


def stack_stripes(x, parts):
    """Cut ``x`` into ``parts`` equal horizontal stripes and stack them on the batch axis.

    Args:
        x (Tensor): [N, C, H, W], H divisible by ``parts``.
        parts (int): K.
    Returns:
        Tensor: [K * N, C, H / K, W]; rows ``k * N .. (k + 1) * N - 1`` hold stripe k.
    """
    _, c, h, w = x.shape
    if not torch.jit.is_tracing() and h % parts:  # static shapes: checked once when traced
        raise ValueError(f"RMGL: a map of height {h} cannot be cut into {parts} equal stripes")
    x = x.reshape(-1, c, parts, h // parts, w)
    return x.permute(2, 0, 1, 3, 4).reshape(-1, c, h // parts, w)


def unstack_stripes(y, parts):
    """Inverse of :func:`stack_stripes`: split the batch into K shards and re-stack them on H.

    Args:
        y (Tensor): [K * N, C, h, W].
        parts (int): K.
    Returns:
        Tensor: [N, C, K * h, W].
    """
    _, c, h, w = y.shape
    y = y.reshape(parts, -1, c, h, w).permute(1, 2, 0, 3, 4)
    return y.reshape(-1, c, parts * h, w)


def receptive_partition(x, fn, parts):
    """Receptive-partitioned path (§III-B, docs/decisions/rmgl.md#rp-path): run ``fn`` on each
    stripe on its own.

    The stripes go through ``fn`` as separate samples, so zero padding at their borders cuts
    the connectivity between them; ``fn`` shares its weights with the original path.

    Args:
        x (Tensor): [N, C, H, W].
        fn (callable): [B, C, h, W] -> [B, C', h', W'] (e.g. a branch's layer2-4).
        parts (int): K.
    Returns:
        Tensor: [N, C', K * h', W'], stripe k's output at rows k * h' .. (k + 1) * h' - 1.
    """
    return unstack_stripes(fn(stack_stripes(x, parts)), parts)


def channel_peaks(x, ties="strict"):
    """Where each channel's spatial maximum is, and whether Eq. 8 counts it.

    Eq. 8 sets ``I_x(h, w, c) = 1`` when every other position of channel ``c`` is strictly
    smaller than ``x[h, w, c]`` and ``0`` when some position is strictly larger; a channel whose
    maximum is reached at several positions (all-zero channels after a ReLU included) satisfies
    neither case. ``ties="strict"`` reads the first case as the definition: such a channel has
    no maximum and counts nowhere. ``ties="first"`` counts it at its first maximal position in
    row-major order (``torch.argmax``; an all-zero channel at row 0), reidzoo's rule before the
    switch existed.

    Args:
        x (Tensor): [N, C, H, W].
        ties (str): "strict" or "first".
    Returns:
        tuple[Tensor, Tensor]: ``index`` [N, C] int64, the row-major position ``h * W + w`` of
        the (first) maximum, and ``counts`` [N, C] bool, whether ``I_x`` is 1 there.
    """
    if ties not in TIES:
        raise ValueError(f"MODEL.RMGL.ABP_TIES={ties!r}; expected one of {TIES}")
    flat = x.flatten(2)  # [N, C, H * W]
    index = flat.argmax(dim=2)
    if ties == "first":
        return index, torch.ones_like(index, dtype=torch.bool)
    peak = flat.amax(dim=2, keepdim=True)
    return index, (flat == peak).sum(dim=2) == 1


def abp_split_points(x, parts, ties="strict"):
    """Per-sample stripe boundaries of activation-balanced pooling (Eq. 8-10).

    ``cnt[h]`` counts the channels whose maximum lies in row h (Eq. 8, see
    :func:`channel_peaks` for channels whose maximum is tied); ``Hx`` is its cumulative sum
    (Eq. 9); ``h_k = #{rows r : Hx(r) <= k C / n_s}`` (Eq. 10, 0-indexed, with ``C`` all the
    channels of ``x`` as the paper writes it, counted or not), clamped to
    ``[h_{k-1} + 1, H - (n_s - k)]`` so every stripe has >= 1 row. Uses argmax / amax /
    comparisons / cumsum only.

    Args:
        x (Tensor): [N, C, H, W] final feature map of the original path.
        parts (int): n_s, 1 <= n_s <= H.
        ties (str): "strict" (Eq. 8: a channel without a unique maximum counts nowhere) or
            "first" (it counts at its first maximal position).
    Returns:
        Tensor: [N, n_s + 1] int64 boundaries, ``b[:, 0] = 0``, ``b[:, n_s] = H``; stripe k
        is rows ``b[:, k] <= r < b[:, k + 1]``.
    """
    n, c, h, w = x.shape
    if not 1 <= parts <= h:
        raise ValueError(f"ABP: cannot cut a map of height {h} into {parts} non-empty stripes")
    index, counted = channel_peaks(x, ties)
    rows = torch.div(index, w, rounding_mode="floor")  # [N, C]
    grid = torch.arange(h, device=x.device)
    hit = (rows.unsqueeze(-1) == grid) & counted.unsqueeze(-1)  # [N, C, H]
    counts = hit.to(torch.float32).sum(dim=1)  # [N, H], Eq. 8 summed over w and c
    cum = torch.cumsum(counts, dim=1)  # Eq. 9
    bounds = [torch.zeros_like(cum[:, 0]).long()]
    for k in range(1, parts):
        # integer-exact form of Hx(r) <= k C / n_s
        h_k = (cum * parts <= float(k * c)).long().sum(dim=1)
        h_k = torch.maximum(h_k, bounds[-1] + 1).clamp(max=h - (parts - k))
        bounds.append(h_k)
    bounds.append(torch.full_like(bounds[0], h))
    return torch.stack(bounds, dim=1)


def stripe_masks(bounds, height):
    """Row masks of the stripes given by ``bounds``.

    Args:
        bounds (Tensor): [N, K + 1] int64, see :func:`abp_split_points`.
        height (int): H.
    Returns:
        Tensor: [N, K, H] bool, True where row r belongs to stripe k.
    """
    r = torch.arange(height, device=bounds.device).view(1, 1, height)
    return (r >= bounds[:, :-1].unsqueeze(-1)) & (r < bounds[:, 1:].unsqueeze(-1))


def masked_stripe_pool(x, masks, mode="max"):
    """Pool ``x`` over each stripe's rows (Eq. 11 with "avg"; GMP with "max").

    Args:
        x (Tensor): [N, C, H, W].
        masks (Tensor): [N, K, H] bool, each stripe non-empty.
        mode (str): "max" or "avg".
    Returns:
        Tensor: [N, K, C].
    """
    m = masks.unsqueeze(2)  # [N, K, 1, H]
    if mode == "max":
        rows = x.amax(dim=3).unsqueeze(1)  # [N, 1, C, H]
        neg = torch.full_like(rows, float("-inf"))
        return torch.where(m, rows, neg).amax(dim=3)
    if mode == "avg":
        rows = x.sum(dim=3).unsqueeze(1)
        area = m.to(x.dtype).sum(dim=3) * x.shape[3]  # [N, K, 1]
        return (rows * m.to(x.dtype)).sum(dim=3) / area
    raise ValueError(f"MODEL.RMGL pooling {mode!r}; expected one of {POOLS}")


def global_pool(x, mode="max"):
    """Args:
        x (Tensor): [N, C, H, W].
        mode (str): "max" (GMP, §III-A) or "avg".
    Returns:
        Tensor: [N, C]."""
    if mode == "max":
        return x.amax(dim=(2, 3))
    if mode == "avg":
        return x.mean(dim=(2, 3))
    raise ValueError(f"MODEL.RMGL pooling {mode!r}; expected one of {POOLS}")


def uniform_stripe_pool(x, parts, mode="max"):
    """Pool K equal horizontal stripes (PCB-style; the RP path and "no ABP").

    Args:
        x (Tensor): [N, C, H, W], H divisible by K.
        parts (int): K.
        mode (str): "max" or "avg".
    Returns:
        Tensor: [N, K, C].
    """
    n, c, h, w = x.shape
    if not torch.jit.is_tracing() and h % parts:  # static shapes: checked once when traced
        raise ValueError(f"RMGL: a map of height {h} cannot be cut into {parts} equal stripes")
    x = x.reshape(-1, c, parts, (h // parts) * w)
    pooled = x.amax(dim=3) if mode == "max" else x.mean(dim=3)
    return pooled.transpose(1, 2)


class ActivationBalancedPooling(nn.Module):
    """ABP (§III-C): stripes with balanced numbers of channel maxima (Eq. 8-10), then pooled.

    No parameters: it pools any [N, C, H, W] map, e.g. the last map of a model of your own
    (``ActivationBalancedPooling(3)``: 3 stripes, max pooling). From a config,
    ``ActivationBalancedPooling(cfg, parts)`` (see :meth:`from_config`; how the ``RMGL``
    model builds one per granularity).

    Args:
        parts (int): n_s, the number of stripes (at most the map's height).
        mode (str): "max" (default, §III-A) or "avg" (Eq. 11).
        ties (str): "strict" (Eq. 8, default) or "first", see :func:`channel_peaks`.
    Raises:
        reidzoo.modeling.arguments.ArgumentError: a wrong value, naming the argument (built
            from a config: a ``ValueError`` naming the config key).
    """

    #: argument -> config key read by :meth:`from_config`
    CONFIG_KEYS = {"mode": "MODEL.RMGL.ABP_POOL", "ties": "MODEL.RMGL.ABP_TIES"}

    @configurable
    def __init__(self, parts, mode="max", ties="strict"):
        self.check_arguments(arguments_of(locals()))
        super().__init__()
        self.parts = int(parts)
        self.mode = mode
        self.ties = ties

    @classmethod
    def from_config(cls, cfg, parts):
        """Constructor arguments from ``cfg.MODEL.RMGL`` (the keys of :attr:`CONFIG_KEYS`).

        Args:
            cfg (CfgNode): root config.
            parts (int): n_s, one of ``MODEL.RMGL.GRANULARITIES``.
        Returns:
            dict: keyword arguments of ``__init__``.
        Raises:
            ValueError: a wrong value, naming its key.
        """
        return arguments_from_config(cfg, cls.CONFIG_KEYS, cls.check_arguments, parts=parts)

    @staticmethod
    def check_arguments(args):
        """Check the constructor's arguments (both construction paths run it).

        Args:
            args (dict): every argument of ``__init__``, by name.
        Raises:
            reidzoo.modeling.arguments.ArgumentError: naming the argument at fault.
        """
        own = "ActivationBalancedPooling"
        if not isinstance(args["parts"], int) or args["parts"] < 1:
            raise ArgumentError(own, {"parts": args["parts"]}, "expected an integer >= 1")
        check_choice(own, "mode", args["mode"], POOLS)
        check_choice(own, "ties", args["ties"], TIES)

    def forward(self, x):
        """Args:
            x (Tensor): [N, C, H, W].
        Returns:
            Tensor: [N, n_s, C] stripe features."""
        bounds = abp_split_points(x.detach(), self.parts, self.ties)
        return masked_stripe_pool(x, stripe_masks(bounds, x.shape[2]), self.mode)

    def extra_repr(self):
        return f"parts={self.parts}, mode={self.mode}, ties={self.ties}"


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def receptive_field(modules):
    """Receptive field (rows) of the output of a chain of modules, from their own layers.

    Walks every ``nn.Conv2d`` / ``nn.MaxPool2d`` / ``nn.AvgPool2d`` in module order, skipping
    residual shortcuts (submodules named ``downsample``, whose field is contained in the main
    path's): ``rf += (k - 1) * dilation * jump``, ``jump *= stride``.

    Args:
        modules (Iterable[nn.Module]): the path in order (e.g. conv1, maxpool, layer1, a
            branch's layer2-4).
    Returns:
        tuple[int, int]: (receptive field, jump) along the height.
    """
    rf, jump = 1, 1
    for module in modules:
        for name, m in module.named_modules():
            if "downsample" in name.split("."):
                continue
            if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                k = _pair(m.kernel_size)[0]
                s = _pair(m.stride)[0]
                d = _pair(getattr(m, "dilation", 1))[0]
                rf += (k - 1) * d * jump
                jump *= s
    return rf, jump
