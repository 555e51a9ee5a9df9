"""PFE's training diagnostics (``REIDZOO.DIAGNOSTICS``): FAB's attention masks (TSAM, Fig. 6b)
and, in stage II, the side features F_2..F_4, F_5 and the activation maps A_s of MFA (§IV-B)."""

from reidzoo.modeling.diagnostics import register_probe

from .modules import FAB, MFA


@register_probe(FAB)
def fab_probe(module, inputs, output):
    """M_FAB ``[N, C, H, W]``: each channel's sigmoid mask over the H*W positions."""
    return {"entropy": {"mask": module.mask(inputs[0]).flatten(2)}}


@register_probe(MFA)
def mfa_probe(module, inputs, output):
    """F_2..F_{S-1} ``[N, SIDE_DIM]``, F_5 = GAP(X_5) ``[N, C_5]`` (the main feature the side
    features are concatenated with) and A_2..A_S ``[N, H_s, W_s]`` over their positions."""
    feats, acts, _ = output
    maps = inputs[0]
    groups = {f"F{s + 2}": f for s, f in enumerate(feats)}
    groups[f"F{len(maps) + 1}"] = maps[-1].mean(dim=(2, 3))
    return {"feat_norm": groups, "entropy": {f"A{s + 2}": a.flatten(1) for s, a in enumerate(acts)}}
