"""PMM's training diagnostics (``REIDZOO.DIAGNOSTICS``): each stage's reduced feature and the
Grad-CAM that guides the next stage's mixing (§2.1-2.2)."""

from reidzoo.modeling.diagnostics import register_probe

from .meta_arch import GlobalReduction, PartReduction
from .modules import FeatureMix


@register_probe(GlobalReduction, PartReduction)
def reduction_probe(module, inputs, output):
    """The stage feature ``[N, D]`` (``heads.reductions.k`` is stage k + 1)."""
    return {"feat_norm": {"feat": output}}


@register_probe(FeatureMix)
def mix_probe(module, inputs, output):
    """The previous stage's Grad-CAM ``[N, h, w]`` (ReLU, non-negative) over the map's
    positions, when the mode uses it; the first call mixes stage II's input, ``call2``
    stage III's."""
    cam = inputs[1]
    return {"entropy": {"cam": cam.flatten(1)}} if cam is not None else {}
