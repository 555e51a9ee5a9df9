"""RMGL (Wang et al., TIP 2020): receptive multi-granularity learning for fast-reid.

Importing this package registers the meta-architecture ``RMGL`` (``META_ARCH_REGISTRY``), the
PIL transforms ``RMGLRandomShift`` (RSA) and ``RMGLCropResizeShift`` (Tab. VI "RCRS")
(``TRANSFORM_REGISTRY``), and adds ``cfg.MODEL.RMGL`` and ``cfg.INPUT.RSA``.
"""

from reidzoo.plugins import declare_maps

from .config import add_rmgl_config
from .meta_arch import RMGL, RMGLHeads
from .modules import (
    ActivationBalancedPooling,
    abp_split_points,
    channel_peaks,
    check_partition,
    masked_stripe_pool,
    receptive_field,
    receptive_partition,
    stack_stripes,
    stripe_masks,
    uniform_stripe_pool,
    unstack_stripes,
)
from .transforms import CropResizeShift, RandomShift, RMGLCropResizeShift, RMGLRandomShift

# The map producer registers when reidzoo.visualize looks producers up: the model code never
# imports the visualisation layer.
declare_maps(__name__ + ".maps")

__all__ = [
    "RMGL",
    "ActivationBalancedPooling",
    "CropResizeShift",
    "RMGLCropResizeShift",
    "RMGLHeads",
    "RMGLRandomShift",
    "RandomShift",
    "abp_split_points",
    "add_rmgl_config",
    "channel_peaks",
    "check_partition",
    "masked_stripe_pool",
    "receptive_field",
    "receptive_partition",
    "stack_stripes",
    "stripe_masks",
    "uniform_stripe_pool",
    "unstack_stripes",
]
