"""PAN (Xiang et al., ACCV 2020): part-aware attention network for fast-reid.

Importing this package registers ``PAN`` (``META_ARCH_REGISTRY``), ``PANHead``
(``HEADS_REGISTRY``) and ``PANNonLocal`` (``STAGE_MODULE_REGISTRY``) and adds
``cfg.MODEL.PAN``.
"""

from reidzoo.plugins import declare_maps

from .config import add_pan_config
from .heads import PANHead, stage_widths
from .meta_arch import PAN
from .modules import PAM, PLM, ChannelAttention, NonLocal, PANNonLocal, StripeParts, orthogonal_loss

# The map producer registers when reidzoo.visualize looks producers up: the model code never
# imports the visualisation layer.
declare_maps(__name__ + ".maps")

__all__ = [
    "PAM",
    "PAN",
    "PLM",
    "ChannelAttention",
    "NonLocal",
    "PANHead",
    "PANNonLocal",
    "StripeParts",
    "add_pan_config",
    "orthogonal_loss",
    "stage_widths",
]
