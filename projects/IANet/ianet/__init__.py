"""IANet (Hou et al., CVPR 2019): interaction-and-aggregation blocks for fast-reid.

Importing this package registers ``IANetIABlock`` (``STAGE_MODULE_REGISTRY``) and
``build_ianet_backbone`` (``BACKBONE_REGISTRY``) and adds ``cfg.MODEL.IANET``.
"""

from . import maps  # noqa: F401  (registers the explanatory-map producer)
from .backbone import build_ianet_backbone
from .config import add_ianet_config
from .ia import CIA, SIA, IABlock, ResidualIA, context_logits, context_offsets, location_relation

__all__ = [
    "CIA",
    "IABlock",
    "ResidualIA",
    "SIA",
    "add_ianet_config",
    "build_ianet_backbone",
    "context_logits",
    "context_offsets",
    "location_relation",
]
