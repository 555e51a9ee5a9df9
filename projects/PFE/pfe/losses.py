"""PFE's side-branch losses: cascade (Eq. 7), independent / uniform (Fig. 2a-b) and region
overlap (Eq. 8)."""

import torch
import torch.nn.functional as F
from fastreid.modeling.losses import cross_entropy_loss

SIDE_LOSSES = ("cascade", "independent", "uniform")


def cascade_loss(side_feats, top_feat, classifiers, temperatures, targets, eps=0.0, alpha=0.2):
    """Eq. 7 for every side s: CE(FC_s([F_s, F_{s+1}, ..., F_S]) / t_s, Y).

    Only F_s receives L_s's gradient: the deeper *features* are detached inside L_s. Their
    maps still reach F_s through Psi_{s+1} (Eq. 10), which is not detached, so L_s also
    trains the deeper T convs.

    Args:
        side_feats (list[Tensor]): F_2..F_{S-1} (BN'd), each [N, D_s].
        top_feat (Tensor): F_S (BN'd) [N, D_S].
        classifiers (Sequence[nn.Module]): FC_s, input sum(D_s..D_S) -> classes.
        temperatures (Sequence[float]): t_s.
        targets (Tensor): [N] identity labels.
        eps (float), alpha (float): fast-reid's label smoothing arguments.
    Returns:
        list[Tensor]: one scalar L_s per side, shallowest first.
    """
    feats = list(side_feats) + [top_feat]
    out = []
    for i, (fc, t) in enumerate(zip(classifiers, temperatures)):
        fused = torch.cat([feats[i]] + [f.detach() for f in feats[i + 1 :]], dim=1)
        out.append(cross_entropy_loss(fc(fused) / float(t), targets, eps, alpha))
    return out


def independent_loss(side_feats, classifiers, targets, eps=0.0, alpha=0.2):
    """Fig. 2a: CE(FC_s(F_s), Y) for each side on its own feature.

    Args:
        side_feats (list[Tensor]): each [N, D_s].
        classifiers (Sequence[nn.Module]): D_s -> classes.
        targets (Tensor): [N].
    Returns:
        list[Tensor]: one scalar per side.
    """
    return [
        cross_entropy_loss(fc(f), targets, eps, alpha) for f, fc in zip(side_feats, classifiers)
    ]


def uniform_loss(side_feats, top_feat, classifier, targets, eps=0.0, alpha=0.2):
    """Fig. 2b: one CE on FC([F_2, ..., F_S]) (every feature receives the same gradient).

    Args:
        side_feats (list[Tensor]): each [N, D_s].
        top_feat (Tensor): [N, D_S].
        classifier (nn.Module): sum(D) -> classes.
        targets (Tensor): [N].
    Returns:
        Tensor: scalar.
    """
    fused = torch.cat(list(side_feats) + [top_feat], dim=1)
    return cross_entropy_loss(classifier(fused), targets, eps, alpha)


RO_REDUCTIONS = ("sum", "mean")


def region_overlap_loss(acts, reduction="sum"):
    """Eq. 8: L_ro = |A_2 * A_3 * ... * A_S|_1, every A_s resized (bilinear) to A_2's
    resolution; summed over pixels (the L1 norm) or averaged over them, averaged over the batch.

    With ``"sum"`` the loss, and its gradient on the side branches, grows with A_2's number of
    positions (H_2 * W_2: layer1 at stride 4 has 1/16 of the input's pixels, 4,608 at
    384x192); ``"mean"`` divides it by H_2 * W_2.

    Args:
        acts (list[Tensor]): A_2..A_S, each [N, H_s, W_s] (non-negative), shallowest first.
        reduction (str): "sum" (the paper's L1 norm) or "mean" over the H_2 x W_2 positions.
    Returns:
        Tensor: scalar.
    Raises:
        ValueError: unknown ``reduction``.
    """
    if reduction not in RO_REDUCTIONS:
        raise ValueError(f"MODEL.PFE.RO_REDUCTION={reduction!r}; expected one of {RO_REDUCTIONS}")
    size = acts[0].shape[-2:]
    prod = acts[0]
    for a in acts[1:]:
        if tuple(a.shape[-2:]) != tuple(size):
            a = F.interpolate(a[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        prod = prod * a
    flat = prod.abs().flatten(1)
    per_sample = flat.sum(dim=1) if reduction == "sum" else flat.mean(dim=1)
    return per_sample.mean()
