"""PAN's training diagnostics (``REIDZOO.DIAGNOSTICS``): part features P and PLM masks
(§3.2), PAM outputs Z^l and compatibility maps theta (Eq. 2-3)."""

from reidzoo.modeling.diagnostics import register_probe

from .modules import PAM, PLM, StripeParts


@register_probe(PLM)
def plm_probe(module, inputs, output):
    """P ``[N, K, C]``; each scale's masks s_j^l over the H*W positions of X^4 (ReLU outputs:
    an all-zero mask is dead, its part feature zero)."""
    parts, masks = output
    maps = {f"mask_l{s}": m for s, m in zip(module.scales, masks)}
    return {"feat_norm": {"P": parts}, "entropy": maps, "dead": maps}


@register_probe(StripeParts)
def stripe_probe(module, inputs, output):
    """Stripe parts P ``[N, K, C]`` (no masks)."""
    return {"feat_norm": {"P": output[0]}}


@register_probe(PAM)
def pam_probe(module, inputs, output):
    """Z^l ``[N, K, C_out]``; theta(P_i, X^l) over the M_l positions of X^l. PAM is linear
    attention (no softmax, theta is signed): position m's weight in Z_i is |theta_i[m]|."""
    parts, x = inputs
    return {"feat_norm": {"Z": output}, "entropy": {"compat": module.compatibility(parts, x).abs()}}
