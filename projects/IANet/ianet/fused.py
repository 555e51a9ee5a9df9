"""Autograd Functions for the IA blocks' training step: the same maths with fewer passes.

The composed autograd graph of an IA block allocates a fresh [N, M, M] (SIA) or [N, C, C]
(CIA) buffer for nearly every step forward and backward, and backpropagates each shifted
slice of the multi-context sum through a zero-filled copy of the whole padded map. The
Functions here compute the same quantities with buffers they own, reused in place, and
hand-written backward passes. They are checked against the composed path (which tracing and
ONNX export still take, see :func:`fused_enabled`) in ``tests/test_ianet.py``.
"""

from collections import Counter

import torch
from torch.autograd import Function
from torch.autograd.function import once_differentiable

# Axes of a [N, H, W, H, W] view of an [N, M, M] position-by-position map that one context
# offset moves together: both y axes, or both x axes (the two positions of a pair share it).
_Y_AXES = (1, 3)
_X_AXES = (2, 4)
_TILE = 256  # tile side of the in-place transpose-add; 256 x 256 fp32 tiles stay in L2


def fused_enabled(requested):
    """Whether the fused Functions may run now.

    They have no ONNX symbolic and TorchScript cannot see into them, so tracing (ONNX export,
    fvcore's counter), scripting and ONNX export take the composed path.

    Args:
        requested (bool): the module's ``fused`` switch.
    Returns:
        bool
    """
    if not requested or torch.jit.is_scripting() or torch.jit.is_tracing():
        return False
    return not torch.onnx.is_in_onnx_export()


def context_range(k):
    """Offsets of a K x K context patch along one axis: ``range(lo, hi + 1)``.

    The anchoring of :func:`~reidzoo.projects.ianet.ia.context_offsets`, whose offsets are
    the product of this range with itself: odd K centred, even K anchored top-left.

    Args:
        k (int): patch size, >= 1.
    Returns:
        tuple[int, int]: (lo, hi), lo <= 0 <= hi.
    Raises:
        ValueError: k < 1.
    """
    if k < 1:
        raise ValueError(f"context patch size must be >= 1, got {k}")
    return -((k - 1) // 2), k // 2


def _shift_add_(dst, src, d, axes, other=None, alpha=1):
    """``dst[.., i, .., j, ..] += alpha * (src * other)[.., i + d, .., j + d, ..]`` on ``axes``.

    Zero outside the map (zero-padded patches, Eq. 1); ``other=None`` reads as 1.

    Args:
        dst, src, other (Tensor): [N, H, W, H, W] (``other`` may be an expanded view); ``dst``
            must not overlap ``src`` or ``other``.
        d (int): offset along both axes.
        axes (tuple[int, int]): :data:`_Y_AXES` or :data:`_X_AXES`.
        alpha (float): factor.
    """
    size = dst.shape[axes[0]]
    lo, hi = max(0, -d), min(size, size - d)
    if hi <= lo:
        return
    a, b = axes
    n = hi - lo
    out = dst.narrow(a, lo, n).narrow(b, lo, n)
    src = src.narrow(a, lo + d, n).narrow(b, lo + d, n)
    if other is None:
        out.add_(src, alpha=alpha)
    else:
        out.addcmul_(src, other.narrow(a, lo + d, n).narrow(b, lo + d, n), value=alpha)


def add_transpose_(g, tile=_TILE):
    """``g <- g + g^T`` over the last two axes, in place, tile by tile.

    The one-shot ``g + g.transpose(1, 2)`` needs a second buffer as large as ``g`` (32 MiB at
    IANet's stage-3 CIA), whose first touch costs more than the addition.

    Args:
        g (Tensor): [N, S, S].
        tile (int): tile side.
    Returns:
        Tensor: ``g``.
    """
    s = g.shape[-1]
    for i in range(0, s, tile):
        ti = min(tile, s - i)
        for j in range(i, s, tile):
            tj = min(tile, s - j)
            upper = g.narrow(1, i, ti).narrow(2, j, tj)
            if i == j:
                upper.add_(upper.transpose(1, 2).clone())
            else:
                lower = g.narrow(1, j, tj).narrow(2, i, ti)
                upper.add_(lower.transpose(1, 2))  # disjoint tiles: no aliasing
                lower.copy_(upper.transpose(1, 2))
    return g


def _softmax_backward_(g, y):
    """``g <- y * (g - rowsum(g * y))``, the softmax backward, in ``g``'s buffer.

    Args:
        g (Tensor): [..., M] gradient w.r.t. ``y``, owned by the caller.
        y (Tensor): softmax output, same shape.
    Returns:
        Tensor: ``g``, now the gradient w.r.t. the logits.
    """
    g.mul_(y)
    return g.addcmul_(y, g.sum(dim=-1, keepdim=True), value=-1)


def _unique_contexts(contexts):
    """Sorted distinct patch sizes and how often each occurs in ``contexts``."""
    counts = Counter(int(k) for k in contexts)
    for k in counts:
        context_range(k)
    ks = tuple(sorted(counts))
    return ks, tuple(counts[k] for k in ks)


def _gram(f, div, positions):
    """``F^T F / div`` ([N, M, M], positions) or ``F F^T`` ([N, C, C]) in a new buffer."""
    out = torch.bmm(f.transpose(1, 2), f) if positions else torch.bmm(f, f.transpose(1, 2))
    if div is not None:
        out.div_(div)
    return out


def _box_sums(dots, h, w, ks):
    """The K x K shifted sums of ``dots`` for increasing K: ``logit_K`` of Eq. 1.

    Separable (the y offsets first, then the x offsets) and nested (the y sum of a larger K
    extends the smaller one's): K = 1, 2, 3 take five in-place shifted additions.

    Args:
        dots (Tensor): [N, M, M]; returned itself for K = 1.
        h, w (int): map size.
        ks (tuple[int, ...]): distinct patch sizes, increasing.
    Returns:
        tuple[list[Tensor], Tensor | None]: the [N, M, M] map per K, and the scratch buffer
        (the last y sum, free for reuse; None when only K = 1 was asked).
    """
    n, m = dots.shape[0], h * w
    d5 = dots.view(n, h, w, h, w)
    outs, ysum, done = [], None, (0, 0)
    for k in ks:
        lo, hi = context_range(k)
        if (lo, hi) == (0, 0):
            outs.append(dots)
            continue
        if ysum is None:
            ysum = d5.clone()
        for dy in range(lo, hi + 1):
            if not done[0] <= dy <= done[1]:
                _shift_add_(ysum, d5, dy, _Y_AXES)
        done = (lo, hi)
        z = ysum.clone()
        for dx in range(lo, hi + 1):
            if dx:
                _shift_add_(z, ysum, dx, _X_AXES)
        outs.append(z.view(n, m, m))
    return outs, (None if ysum is None else ysum.view(n, m, m))


def _x_adjoints(u5, ks, mults, p5s=None, r5=None):
    """``U_K = m_K X_K^T (u - p_K r)`` per K: the x half of the adjoint of :func:`_box_sums`.

    ``X_K^T`` adds every map back at the opposite x shifts of K's range. The smallest K, when
    it is K = 1, is formed in ``u5``'s own buffer, after all the others have read it.

    Args:
        u5 (Tensor): [N, H, W, H, W], owned by the caller.
        ks, mults (tuple[int, ...]): distinct patch sizes (increasing) and their counts.
        p5s (list[Tensor] | None): per K, a [N, H, W, H, W] map; None: ``G_K = m_K u``.
        r5 (Tensor | None): [N, H, W, H, W] (expanded row sums), with ``p5s``.
    Returns:
        list[Tensor]: ``U_K`` per K, each its own buffer.
    """
    us = [None] * len(ks)
    for idx in reversed(range(len(ks))):
        lo, hi = context_range(ks[idx])
        p5 = None if p5s is None else p5s[idx]
        if (lo, hi) == (0, 0) and idx == 0:
            u = u5  # every other K has read u5 already
        else:
            u = u5.clone(memory_format=torch.contiguous_format)
        if p5 is not None:
            u.addcmul_(p5, r5, value=-1)
        for dx in range(lo, hi + 1):
            if dx:
                _shift_add_(u, u5, -dx, _X_AXES)
                if p5 is not None:
                    _shift_add_(u, p5, -dx, _X_AXES, other=r5, alpha=-1)
        if mults[idx] != 1:
            u.mul_(mults[idx])
        us[idx] = u
    return us


def _y_adjoint_sum(us, ks):
    """``sum_K Y_K^T U_K``: the y half of the adjoint of :func:`_box_sums`, summed over K.

    The y ranges are nested, so ``P_K = sum over K' >= K of U_K'`` (formed in place, from
    the largest K down) feeds the y offsets that K has and the next smaller K has not.

    Args:
        us (list[Tensor]): [N, H, W, H, W] per K (increasing), owned; overwritten.
        ks (tuple[int, ...]): the patch sizes.
    Returns:
        Tensor: [N, H, W, H, W].
    """
    for idx in reversed(range(len(us) - 1)):
        us[idx].add_(us[idx + 1])
    outer = []
    for idx, k in enumerate(ks):
        lo, hi = context_range(k)
        inner = context_range(ks[idx - 1]) if idx else (0, 0)
        outer.append([dy for dy in range(lo, hi + 1) if not inner[0] <= dy <= inner[1]])
    acc = us[0].clone() if outer[0] else us[0]  # offset dy = 0 of every K is P_min itself
    for u, dys in zip(us, outer):
        for dy in dys:
            _shift_add_(acc, u, -dy, _Y_AXES)
    return acc


class _ContextLogits(Function):
    """``F^T F / div`` and its K x K shifted sums, one [N, M, M] map per distinct K.

    Backward: the adjoint of the shifted sums (each output gradient added back at the opposite
    shifts) in buffers of its own, made symmetric in place, times F.
    """

    @staticmethod
    def forward(ctx, f, div, h, w, ks):
        ctx.save_for_backward(f)
        ctx.div, ctx.h, ctx.w, ctx.ks = div, h, w, ks
        return tuple(_box_sums(_gram(f, div, True), h, w, ks)[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        (f,) = ctx.saved_tensors
        h, w, ks = ctx.h, ctx.w, ctx.ks
        n, m = f.shape[0], h * w
        us = []
        for k, g in zip(ks, grads):
            lo, hi = context_range(k)
            g5 = g.reshape(n, h, w, h, w)
            u = g5.clone(memory_format=torch.contiguous_format)
            for dx in range(lo, hi + 1):
                if dx:
                    _shift_add_(u, g5, -dx, _X_AXES)
            us.append(u)
        sym = add_transpose_(_y_adjoint_sum(us, ks).view(n, m, m))
        grad = torch.bmm(f, sym)
        if ctx.div is not None:
            grad.div_(ctx.div)
        return grad, None, None, None, None


def fused_context_logits(f, h, w, contexts, div=None):
    """Context logits ``logit_K`` (Eq. 1) straight from the features, with a fused backward.

    Equal to :func:`~reidzoo.projects.ianet.ia.context_logits` of ``F^T F / div``.

    Args:
        f (Tensor): F, [N, C, M], M = h * w (row-major).
        h, w (int): map size.
        contexts (Sequence[int]): patch sizes K (repeats allowed).
        div (float | None): divisor of the dot products (sqrt(C) for SIA's scaling).
    Returns:
        list[Tensor]: one [N, M, M] logit map per entry of ``contexts``.
    Raises:
        ValueError: a patch size < 1, or ``f`` is not [N, C, h * w].
    """
    _check_features(f, h, w)
    ks, _ = _unique_contexts(contexts)
    outs = dict(zip(ks, _ContextLogits.apply(f, div, h, w, ks)))
    return [outs[int(k)] for k in contexts]


def _check_features(f, h, w):
    if f.dim() != 3 or f.shape[-1] != h * w:
        raise ValueError(f"features of shape {tuple(f.shape)}; expected [N, C, {h} * {w}]")


class _ProdRelation(Function):
    """SIA with product fusion, from F to ``S`` and ``E^S = F S^T`` in one Function.

    ``mode="softmax"`` (Eq. 2, 5): ``S^A = softmax(prod_K softmax(logit_K))`` (no outer softmax
    for one context), ``S = softmax(S^A * S^L)`` (``S = S^A`` without S^L).
    ``mode="renorm"``: renormalising a product of softmaxes is the softmax of the summed logits,
    and ``log S^L = -d`` up to a row constant, so ``S = softmax(sum_K logit_K - d)``.

    In the softmax mode every context's logit gradient is ``m_K (u - p_K r)`` with
    ``u = dS^A_pre * prod_K p_K`` and ``r`` its row sums, so the product's backward needs no
    per-context products.
    """

    @staticmethod
    def forward(ctx, f, div, h, w, ks, mults, mode, loc, aggregate):
        ctx.set_materialize_grads(False)
        zs, scratch = _box_sums(_gram(f, div, True), h, w, ks)
        multi = sum(mults) > 1
        if mode == "renorm":
            z = zs[0]
            if mults[0] != 1:
                z.mul_(mults[0])
            for more, mult in zip(zs[1:], mults[1:]):
                z.add_(more, alpha=mult)
            if loc is not None:
                z.add_(loc)  # -d
            s = torch.softmax(z, dim=-1, out=z)
            ctx.save_for_backward(f, s)
        else:
            for z in zs:
                torch.softmax(z, dim=-1, out=z)
            ps = zs
            if multi:
                entries = [p for p, mult in zip(ps, mults) for _ in range(mult)]
                s_a = torch.mul(entries[0], entries[1], out=scratch)
                for p in entries[2:]:
                    s_a.mul_(p)
                torch.softmax(s_a, dim=-1, out=s_a)
            else:
                s_a = ps[0]
            if loc is not None:
                s = torch.mul(s_a, loc)
                torch.softmax(s, dim=-1, out=s)
            else:
                s = s_a
            ctx.save_for_backward(f, s, s_a, *ps)
        ctx.div, ctx.h, ctx.w, ctx.ks, ctx.mults = div, h, w, ks, mults
        ctx.mode, ctx.loc, ctx.multi, ctx.aggregate = mode, loc, multi, aggregate
        if aggregate:
            return torch.bmm(f, s.transpose(1, 2)), s
        return s

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        f, s = ctx.saved_tensors[:2]
        h, w, ks, mults = ctx.h, ctx.w, ctx.ks, ctx.mults
        n, m = f.shape[0], h * w
        grad_e, grad_s = grads if ctx.aggregate else (None, grads[0])
        if grad_e is None and grad_s is None:
            return (None,) * 9
        if grad_e is not None:
            g = torch.bmm(grad_e.transpose(1, 2), f)  # dL/dS through E^S = F S^T
            if grad_s is not None:
                g.add_(grad_s)
            grad = torch.bmm(grad_e, s)
        else:
            g = grad_s.clone(memory_format=torch.contiguous_format)
            grad = None
        if ctx.mode == "renorm":
            g = _softmax_backward_(g, s)
            us = _x_adjoints(g.view(n, h, w, h, w), ks, mults)
        else:
            s_a, ps = ctx.saved_tensors[2], ctx.saved_tensors[3:]
            if ctx.loc is not None:
                g = _softmax_backward_(g, s).mul_(ctx.loc)  # dL/dS^A
            if ctx.multi:
                g = _softmax_backward_(g, s_a)  # dL/d(prod_K p_K)
                for p, mult in zip(ps, mults):
                    for _ in range(mult):
                        g.mul_(p)
            else:
                g.mul_(ps[0])
            r = g.sum(dim=-1, keepdim=True).view(n, h, w, 1, 1).expand(n, h, w, h, w)
            p5s = [p.view(n, h, w, h, w) for p in ps]
            us = _x_adjoints(g.view(n, h, w, h, w), ks, mults, p5s, r)
        sym = add_transpose_(_y_adjoint_sum(us, ks).view(n, m, m))
        alpha = 1.0 if ctx.div is None else 1.0 / ctx.div
        if grad is None:
            grad = torch.bmm(f, sym).mul_(alpha)
        else:
            grad.baddbmm_(f, sym, alpha=alpha)
        return grad, None, None, None, None, None, None, None, None


def fused_prod_relation(f, h, w, contexts, div=None, norm="softmax", loc=None, aggregate=True):
    """SIA's relation map with product fusion, and optionally its aggregation, fused.

    Equal to the composed path of :class:`~reidzoo.projects.ianet.ia.SIA` with
    ``fusion="prod"`` and the relation "appearance" (``loc=None``) or "semantic". With
    "renorm" the closed form ``softmax(sum_K logit_K - d)`` stays exact where the composed
    path's product of probabilities underflows (peaked rows); elsewhere both agree to fp32
    rounding.

    Args:
        f (Tensor): F, [N, C, M], M = h * w (row-major).
        h, w (int): map size.
        contexts (Sequence[int]): patch sizes K (repeats allowed).
        div (float | None): divisor of the dot products (sqrt(C) for SIA's scaling).
        norm (str): "softmax" (Eq. 2, 5) or "renorm".
        loc (Tensor | None): [M, M] without gradient: S^L for "softmax", its logits ``-d``
            for "renorm"; None for the appearance relation.
        aggregate (bool): also return ``E^S = F S^T``.
    Returns:
        Tensor or tuple[Tensor, Tensor]: ``S`` [N, M, M], or (``E^S`` [N, C, M], ``S``).
    Raises:
        ValueError: bad ``norm``, a patch size < 1, ``f`` not [N, C, h * w], or a ``loc``
            that requires grad.
    """
    if norm not in ("softmax", "renorm"):
        raise ValueError(f"MODEL.IANET.FUSION_NORM={norm!r}; expected 'softmax' or 'renorm'")
    _check_features(f, h, w)
    if loc is not None and loc.requires_grad:
        raise ValueError("the location map must not require grad")
    ks, mults = _unique_contexts(contexts)
    return _ProdRelation.apply(f, div, h, w, ks, mults, norm, loc, aggregate)


class _ChannelAggregation(Function):
    """``E = softmax(F F^T) F`` (Eq. 7-8) with the softmax and its backward in place.

    Backward: ``dF = A^T dE + (G + G^T) F``, ``A`` the relation map and ``G`` the gradient of
    its logits; ``G + G^T`` is formed in ``G``'s own buffer.
    """

    @staticmethod
    def forward(ctx, f):
        a = _gram(f, None, False)
        torch.softmax(a, dim=-1, out=a)
        ctx.save_for_backward(f, a)
        return torch.bmm(a, f)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_e):
        f, a = ctx.saved_tensors
        g = _softmax_backward_(torch.bmm(grad_e, f.transpose(1, 2)), a)
        grad = torch.bmm(a.transpose(1, 2), grad_e)
        return grad.baddbmm_(add_transpose_(g), f)


def fused_channel_aggregation(f):
    """CIA's ``E^C = softmax(F F^T) F`` (Eq. 7-8) with a fused backward.

    Args:
        f (Tensor): F, [N, C, M].
    Returns:
        Tensor: [N, C, M].
    """
    return _ChannelAggregation.apply(f)
