"""IANet (Hou et al., CVPR 2019): interaction-and-aggregation blocks for fast-reid.

Importing this package registers ``IANetIABlock`` (``STAGE_MODULE_REGISTRY``) and
``build_ianet_backbone`` (``BACKBONE_REGISTRY``) and adds ``cfg.MODEL.IANET``.
"""

from reidzoo.plugins import declare_maps

from .backbone import build_ianet_backbone
from .config import add_ianet_config
from .ia import CIA, SIA, IABlock, ResidualIA, context_logits, context_offsets, location_relation

# The map producer registers when reidzoo.visualize looks producers up: the model code never
# imports the visualisation layer.
declare_maps(__name__ + ".maps")

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
