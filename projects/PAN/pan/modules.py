"""PAN's building blocks: PLM (part learning), stripe parts, PAM (part-aware attention),
the orthogonal regularisation of the part masks, and the Table 2 non-local block.

Shapes: N batch, C channels of the part source X^4, K parts, C_l / M_l = H_l * W_l channels
and positions of a mid-level map X^l, D the inner dimension of PAM.
"""

import torch
import torch.nn.functional as F
from fastreid.layers import get_norm
from torch import nn

from reidzoo.registry import STAGE_MODULE_REGISTRY


def _fp32(x):
    return x.float() if x.is_floating_point() else x


def _init_conv_bn(module):
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ChannelAttention(nn.Module):
    """SE-style channel attention c^l of one PLM scale (§3.2, §4.1; SE-Net [34]).

    GAP -> FC(C -> C/r) -> ReLU -> FC(C/r -> C) -> sigmoid (or ReLU, the literal §4.1 text).

    Args:
        channels (int): C.
        reduction (int): r.
        act (str): "sigmoid" or "relu".
    """

    def __init__(self, channels, reduction=16, act="sigmoid"):
        super().__init__()
        if act not in ("sigmoid", "relu"):
            raise ValueError(f"MODEL.PAN.CA_ACT={act!r}; expected 'sigmoid' or 'relu'")
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        self.act = nn.Sigmoid() if act == "sigmoid" else nn.ReLU()

    def forward(self, pooled):
        """Args:
            pooled (Tensor): [N, C] globally average-pooled X^4.
        Returns:
            Tensor: [N, C] channel weights c^l."""
        return self.act(self.fc2(F.relu(self.fc1(pooled))))


class PLM(nn.Module):
    """Multi-granularity part feature learning module (§3.2, Fig. 3; docs/decisions/pan.md#plm).

    Spatial attention: Conv1x1(C -> hidden)-BN-ReLU, Conv1x1(hidden -> K)-BN-ReLU, K = sum of
    the scales; the K output channels are the masks s_j^l, split by scale in order. Channel
    attention: one :class:`ChannelAttention` c^l per scale. Part vector
    ``P_j^l = AvgPool((c^l (x) s_j^l) . X^4) = c^l * mean_p(s_j^l[p] X^4[:, p])``, computed
    without materialising the C x H x W mask m_j^l.

    Args:
        in_channels (int): C of X^4.
        scales (Sequence[int]): granularities, e.g. (1, 2, 3) -> 6 parts.
        hidden (int): width of the first spatial-attention block.
        ca_reduction (int): r of the channel attention.
        ca_act (str): "sigmoid" or "relu".
        norm (str): fast-reid norm type of the spatial-attention BNs.
        mask_act (str): last activation of the spatial attention: "relu" (the paper) or
            "softplus" (positive everywhere, so a mask cannot die).
    """

    def __init__(
        self, in_channels, scales=(1, 2, 3), hidden=256, ca_reduction=16, ca_act="sigmoid",
        norm="BN", mask_act="relu",
    ):  # fmt: skip
        super().__init__()
        self.scales = tuple(int(s) for s in scales)
        if not self.scales or min(self.scales) < 1:
            raise ValueError(f"MODEL.PAN.SCALES={list(scales)}; expected positive integers")
        self.num_parts = sum(self.scales)
        if mask_act not in ("relu", "softplus"):
            raise ValueError(f"MODEL.PAN.MASK_ACT={mask_act!r}; expected 'relu' or 'softplus'")
        self.spatial = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False),
            get_norm(norm, hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, self.num_parts, 1, bias=False),
            get_norm(norm, self.num_parts),
            nn.ReLU(inplace=True) if mask_act == "relu" else nn.Softplus(),
        )
        self.channel = nn.ModuleList(
            ChannelAttention(in_channels, ca_reduction, ca_act) for _ in self.scales
        )
        _init_conv_bn(self)

    def masks(self, x):
        """Spatial masks of all parts.

        Args:
            x (Tensor): [N, C, H, W] X^4.
        Returns:
            Tensor: [N, K, H*W] s_j^l, scales in order (>= 0: ReLU or softplus output).
        """
        return self.spatial(x).flatten(2)

    def forward(self, x):
        """Args:
            x (Tensor): [N, C, H, W] X^4.
        Returns:
            tuple: parts P [N, K, C] (float32) and a list with one [N, l, H*W] mask stack
            M^l per scale."""
        s = self.masks(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            s32, f = _fp32(s), _fp32(x).flatten(2)  # [N, K, M], [N, C, M]
            pooled = torch.bmm(s32, f.transpose(1, 2)) / f.shape[-1]  # [N, K, C]
            gap = f.mean(-1)  # [N, C]
            parts, masks, start = [], [], 0
            for scale, ca in zip(self.scales, self.channel):
                parts.append(pooled[:, start : start + scale] * ca(gap).unsqueeze(1))
                masks.append(s32[:, start : start + scale])
                start += scale
        return torch.cat(parts, 1), masks

    def pool_map(self, y, masks):
        """Pool another map with this sample's part masks (Table 2 conv / identity connections).

        Args:
            y (Tensor): [N, C', h, w] on X^4's grid.
            masks (list[Tensor]): :meth:`forward`'s masks.
        Returns:
            Tensor: [N, K, C'] (float32), see :func:`pool_with_masks`.
        """
        return pool_with_masks(y, masks)


class StripeParts(nn.Module):
    """Horizontal stripe parts (PCB [5]; Table 1 "Horizon strips", 1 stripe = global pooling).

    Args:
        num_stripes (int): K; the map height should be divisible by it.
    """

    def __init__(self, num_stripes=6):
        super().__init__()
        self.num_parts = int(num_stripes)

    def forward(self, x):
        """Args:
            x (Tensor): [N, C, H, W].
        Returns:
            tuple: parts [N, K, C] (float32) and an empty mask list (no L_orth)."""
        p = F.adaptive_avg_pool2d(_fp32(x), (self.num_parts, 1)).flatten(2)  # [N, C, K]
        return p.transpose(1, 2), []

    def pool_map(self, y, masks):
        """The same stripes of another map (image rows align whatever its resolution).

        Args:
            y (Tensor): [N, C', h', w'].
            masks (list): unused (stripes have no masks).
        Returns:
            Tensor: [N, K, C'] (float32).
        """
        return self(y)[0]


class PAM(nn.Module):
    """Part-aware attention module (§3.1, Eq. 1-3, Fig. 2): ``Z = phi(P) psi(X)^T f(X) / M``.

    Linear attention, no softmax, normalised by the number of positions M of X. phi, psi, f
    are 1x1 convolutions with bias and PyTorch's default initialisation (phi acts on P as a
    [C_p, K, 1] map).

    Evaluation order (same maths, re-associated): psi and f are linear maps of X, so with
    ``q = phi(P)`` ([D, K]), ``psi(X) = W_psi X + b_psi`` and ``f(X) = W_f X + b_f``::

        theta = (q^T W_psi) X + q^T b_psi                       [K, M]   (Eq. 2)
        Z     = ((theta X^T) / M) W_f^T + mean_j(theta) b_f^T    [K, O]   (Eq. 3)

    Every product has the K = 6 part rows on one side, so the cost is ``O(K C M)`` instead of
    the ``O((D + O) C M)`` of applying psi and f to X at every position, and neither psi(X) nor
    f(X) ([D, M], [O, M], the largest tensors of the block) is ever built. This is not
    ``psi(X)^T f(X)`` ([D, O]) first (docs/decisions/pan.md#pam-order), which still needs
    both projections: with K << D the K x M compatibility map is the smaller intermediate
    (6 x 3,072 on layer1 at 384x128 against 256 x 256). Runs in float32 under autocast.

    ``norm`` (``MODEL.PAN.PAM_NORM``; not in the paper) adds a normalisation layer on Z, per
    output channel over the batch and the K parts: ``Z <- BN(Z)``. Z is trilinear in the block's
    weights (phi, psi, f) and in X^l, so nothing bounds its scale; from random initialisation
    under the paper's learning rate of 0.1 it grows by orders of magnitude within a few steps
    (README). After the norm Z is invariant to the scale of phi, psi and f.

    Args:
        in_channels (int): C_l of X^l.
        part_dim (int): C_p of the part vectors.
        inner_dim (int): D.
        out_dim (int): channels of Z (C_l for PAN_c, C_p for PAN_a).
        norm (str): fast-reid norm type applied to Z ("BN", "syncBN", ...), or "" for none
            (Eq. 1-3 literally).
    """

    def __init__(self, in_channels, part_dim, inner_dim=256, out_dim=None, norm=""):
        super().__init__()
        out_dim = in_channels if out_dim is None else out_dim
        self.phi = nn.Conv2d(part_dim, inner_dim, 1)
        self.psi = nn.Conv2d(in_channels, inner_dim, 1)
        self.f = nn.Conv2d(in_channels, out_dim, 1)  # PyTorch's default init (paper: none)
        self.norm = get_norm(norm, out_dim) if norm else None
        if self.norm is not None:
            _init_conv_bn(self.norm)

    def _theta(self, parts, x):
        """Float32 compatibility map theta [N, K, M] and X flattened [N, C_l, M]."""
        q = self.phi(parts.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)  # [N,K,D]
        f = x.flatten(2)  # [N, C, M]
        theta = torch.bmm(torch.matmul(q, self.psi.weight.flatten(1)), f)  # (q^T W_psi) X
        if self.psi.bias is not None:
            theta = theta + torch.matmul(q, self.psi.bias.unsqueeze(-1))  # + q^T b_psi
        return theta, f

    def compatibility(self, parts, x):
        """theta(P_i, X) of Eq. 2 for every part and position (for visualisation, Fig. 5).

        Args:
            parts (Tensor): [N, K, C_p].
            x (Tensor): [N, C_l, H, W].
        Returns:
            Tensor: [N, K, H*W].
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._theta(_fp32(parts), _fp32(x))[0]

    def forward(self, parts, x):
        """Args:
            parts (Tensor): [N, K, C_p] part features P.
            x (Tensor): [N, C_l, H, W] mid-level map X^l.
        Returns:
            Tensor: [N, K, C_out] Z (float32)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            theta, f = self._theta(_fp32(parts), _fp32(x))
            pooled = torch.bmm(theta, f.transpose(1, 2)) / f.shape[-1]  # [N, K, C]
            z = torch.matmul(pooled, self.f.weight.flatten(1).t())  # [N, K, O]
            if self.f.bias is not None:
                z = z + theta.mean(-1, keepdim=True) * self.f.bias
            if self.norm is not None:  # per channel over N x K: [N, O, K, 1] for a 2-d norm
                z = self.norm(z.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
            return z


class ConvConnection(nn.Module):
    """Conv connection block of Table 2 (Conv_a / Conv_c, §4.2 "Feature fusion in PAN").

    A cascade of Conv1x1(stride)-BN-ReLU blocks from X^l towards X^4: one block per backbone
    stage after stage l (3 blocks for X^1, 2 for X^2, 1 for X^3), each doubling the channels for
    additive fusion (C_l -> 2 C_l -> ... -> C of X^4, e.g. 256 -> 512 -> 1024 -> 2048) or keeping
    them for concatenation (C_l -> C_l). The paper gives kernel 1 and stride 2; the stride of the
    last block (the one parallel to layer4) is configurable because layer4 has stride 1 here.

    Args:
        in_channels (int): C_l of X^l.
        num_blocks (int): cascade length (stages between X^l and X^4).
        widen (bool): double the channels in every block (additive fusion).
        stride (int): stride of every block but the last (paper: 2).
        last_stride (int): stride of the last block (paper: 2; 1 lands on X^4's grid when
            layer4 has stride 1).
        norm (str): fast-reid norm type.
    """

    def __init__(self, in_channels, num_blocks, widen, stride=2, last_stride=2, norm="BN"):
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"ConvConnection needs at least one block, got {num_blocks}")
        layers, c = [], in_channels
        for k in range(num_blocks):
            out = c * 2 if widen else c
            s = last_stride if k == num_blocks - 1 else stride
            layers += [nn.Conv2d(c, out, 1, stride=s, bias=False), get_norm(norm, out),
                       nn.ReLU(inplace=True)]  # fmt: skip
            c = out
        self.blocks = nn.Sequential(*layers)
        self.out_channels = c
        _init_conv_bn(self)

    def forward(self, x):
        """Args:
            x (Tensor): [N, C_l, H_l, W_l].
        Returns:
            Tensor: [N, out_channels, H', W'] (H' = H_l / 2^(blocks - 1) / last_stride)."""
        return self.blocks(x)


def pool_with_masks(y, masks):
    """Part vectors of a map ``y`` pooled with PLM's spatial masks s_j^l (no channel attention):
    ``Z_j = mean_p(s_j[p] * y[:, p])`` over X^4's grid. Runs in float32 under autocast.

    Args:
        y (Tensor): [N, C, h, w] on X^4's grid (see :func:`grid_resampler`).
        masks (list[Tensor]): PLM's masks, one [N, l, h*w] per scale.
    Returns:
        Tensor: [N, K, C] (float32).
    """
    with torch.autocast(device_type=y.device.type, enabled=False):
        s = torch.cat([_fp32(m) for m in masks], 1)  # [N, K, h*w]
        f = _fp32(y).flatten(2)  # [N, C, h*w]
        if not torch.jit.is_tracing() and f.shape[-1] != s.shape[-1]:
            raise ValueError(
                f"PAN: a connected map has {f.shape[-1]} positions but the part masks have "
                f"{s.shape[-1]} (X^4's grid); check MODEL.BACKBONE.LAST_STRIDE and "
                "MODEL.PAN.CONV_LAST_STRIDE"
            )
        return torch.bmm(s, f.transpose(1, 2)) / f.shape[-1]


def grid_resampler(stride_ratio):
    """The module that brings a map to X^4's grid, from the ratio of its stride to X^4's.

    Static (no shape reads at run time, so it exports with fixed factors): ratio 1 is the
    identity, an integer ratio > 1 (a coarser map, e.g. a stride-2 conv cascade next to a
    last-stride-1 layer4) is nearest upsampling, a ratio 1/k (a finer map) is k x k average
    pooling.

    Args:
        stride_ratio (Fraction): stride of the map / stride of X^4.
    Returns:
        nn.Module
    """
    if stride_ratio == 1:
        return nn.Identity()
    if stride_ratio > 1 and stride_ratio.denominator == 1:
        return nn.Upsample(scale_factor=int(stride_ratio), mode="nearest")
    if stride_ratio < 1 and stride_ratio.numerator == 1:
        return nn.AvgPool2d(stride_ratio.denominator)
    raise ValueError(f"PAN: cannot bring a map with stride ratio {stride_ratio} to X^4's grid")


def orthogonal_loss(masks, normalize=False):
    """Orthogonal regularisation of the part masks (Eq. 4).

    ``L_orth = 1/L sum_l ||M^l M^l^T - I||_F``, averaged over the batch; M^l stacks the
    flattened masks of scale l as rows (raw, or L2-normalised per row).

    Args:
        masks (list[Tensor]): one [N, l, H*W] stack per scale.
        normalize (bool): divide each row by its L2 norm first.
    Returns:
        Tensor: scalar (float32); 0 for an empty list.
    """
    if not masks:
        return torch.zeros(())
    total = 0.0
    for m in masks:
        m = _fp32(m)
        if normalize:
            m = F.normalize(m, dim=-1)
        gram = torch.bmm(m, m.transpose(1, 2))
        eye = torch.eye(m.shape[1], dtype=m.dtype, device=m.device)
        total = total + torch.linalg.matrix_norm(gram - eye, ord="fro").mean()
    return total / len(masks)


class NonLocal(nn.Module):
    """Dot-product non-local block with residual (Wang et al. [31]; PAN Table 2 "NL").

    ``z = x + BN(W(y))``, ``y_i = 1/M' sum_j theta(x_i)^T phi(x_j) g(x_j)`` with inter-channels
    C / reduction and phi, g max-pooled 2x2 when ``subsample``. The BN starts at zero, so a
    fresh block is the identity. (fast-reid's ``Non_local`` computes its inter-channels as
    ``reduc_ratio // reduc_ratio`` = 1, which is not the paper's C/2.)

    Args:
        channels (int): C.
        reduction (int): inter-channels = C // reduction.
        subsample (bool): 2x2 max-pool phi and g.
        norm (str): fast-reid norm type.
    """

    def __init__(self, channels, reduction=2, subsample=True, norm="BN"):
        super().__init__()
        inter = max(channels // reduction, 1)
        self.theta = nn.Conv2d(channels, inter, 1)
        self.phi = nn.Conv2d(channels, inter, 1)
        self.g = nn.Conv2d(channels, inter, 1)
        self.W = nn.Conv2d(inter, channels, 1)
        self.bn = get_norm(norm, channels)
        self.pool = nn.MaxPool2d(2) if subsample else nn.Identity()
        _init_conv_bn(self)
        nn.init.zeros_(self.bn.weight)

    def forward(self, x):
        """Args:
            x (Tensor): [N, C, H, W].
        Returns:
            Tensor: [N, C, H, W]."""
        n, _, h, w = x.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = _fp32(x)
            t = self.theta(x32).flatten(2)  # [N, I, M]
            p = self.pool(self.phi(x32)).flatten(2)  # [N, I, M']
            g = self.pool(self.g(x32)).flatten(2)  # [N, I, M']
            a = torch.bmm(t.transpose(1, 2), p) / p.shape[-1]  # [N, M, M']
            y = torch.bmm(g, a.transpose(1, 2)).reshape(n, -1, h, w)  # [N, I, H, W]
        return x + self.bn(self.W(y)).to(x.dtype)


@STAGE_MODULE_REGISTRY.register()
def PANNonLocal(cfg, stage, channels):
    """``MODEL.BACKBONE.INSERTS: ["layer2:PANNonLocal"]``: a :class:`NonLocal` block after a
    stage of any staged-ResNet model (``MODEL.PAN.NL_REDUCTION``, ``NL_SUBSAMPLE``).

    Returns:
        NonLocal
    """
    return NonLocal(
        channels, cfg.MODEL.PAN.NL_REDUCTION, cfg.MODEL.PAN.NL_SUBSAMPLE, cfg.MODEL.BACKBONE.NORM
    )
