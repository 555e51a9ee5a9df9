"""RMGL's training diagnostics (``REIDZOO.DIAGNOSTICS``): reduced features per branch and path,
and the last backbone stage of every branch (each branch has its own copy of layer4)."""

import torch

from reidzoo.modeling.diagnostics import register_last_stages, register_probe

from .meta_arch import RMGL, RMGLHeads


@register_probe(RMGLHeads)
def heads_probe(module, inputs, output):
    """Reduced features ``[N, 256]`` grouped by branch and path (``local2_orig``: its global
    and stripe features, ``local2_rp``, ...), one ``[N, F, 256]`` group each."""
    groups = {}
    for name, f in zip(module.names, output):
        groups.setdefault(name.rpartition("_")[0], []).append(f)
    return {"feat_norm": {g: torch.stack(fs, 1) for g, fs in groups.items()}}


@register_last_stages(RMGL)
def rmgl_last_stages(model):
    """The layer4 copy of every branch (``branches.<b>.<last>``)."""
    return [branch[-1] for branch in model.branches]
