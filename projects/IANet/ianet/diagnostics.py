"""IANet's training diagnostics (``REIDZOO.DIAGNOSTICS``): the SIA and CIA relation maps
(Eq. 5, Eq. 7), whose rows are the softmax weights each position (channel) aggregates with."""

from reidzoo.modeling.diagnostics import register_probe

from .ia import CIA, SIA


@register_probe(SIA, CIA)
def relation_probe(module, inputs, output):
    """S ``[N, M, M]`` (SIA, over the M = h*w positions) or ``[N, C, C]`` (CIA, over the
    channels), recomputed from the module's input by its own ``relation_map``."""
    return {"entropy": {"relation": module.relation_map(inputs[0])}}
