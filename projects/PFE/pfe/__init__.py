"""PFE: progressive feature enhancement (TIP) for fast-reid.

Importing this package registers ``PFE`` (``META_ARCH_REGISTRY``) and ``PFETSAM``
(``STAGE_MODULE_REGISTRY``) and adds ``cfg.MODEL.PFE``.
"""

from reidzoo.plugins import declare_maps

from .config import add_pfe_config
from .losses import cascade_loss, independent_loss, region_overlap_loss, uniform_loss
from .meta_arch import PFE, PFEHeads
from .modules import (
    FAB,
    MFA,
    PFETSAM,
    SEB,
    TSAM,
    activation_map,
    mask_count,
    resize_to,
    side_conv,
    top_alpha_mask,
)

# The map producer registers when reidzoo.visualize looks producers up: the model code never
# imports the visualisation layer.
declare_maps(__name__ + ".maps")

__all__ = [
    "FAB",
    "MFA",
    "PFE",
    "PFEHeads",
    "PFETSAM",
    "SEB",
    "TSAM",
    "activation_map",
    "add_pfe_config",
    "cascade_loss",
    "independent_loss",
    "mask_count",
    "region_overlap_loss",
    "resize_to",
    "side_conv",
    "top_alpha_mask",
    "uniform_loss",
]
