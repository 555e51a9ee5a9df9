"""PMM (arXiv 2007.08779): progressive multi-stage feature mix with attentive Hard-Mix.

Importing this package registers the meta-architecture ``PMM`` (``META_ARCH_REGISTRY``), the
tensor transform ``PMMCutout`` (``TRANSFORM_REGISTRY``), and adds ``cfg.MODEL.PMM`` and
``cfg.INPUT.PMM_CUTOUT``.
"""

from . import maps  # noqa: F401  (registers the explanatory-map producer)
from .config import add_pmm_config
from .meta_arch import PMM, PMMHeads, set_layer_stride
from .modules import (
    FeatureMix,
    attentive_mask,
    batch_drop_mask,
    block_scores,
    check_blocks,
    cutmix_box_mask,
    draw_negatives,
    grad_cam,
    hard_mix,
    random_mask,
    topk_block_mask,
)
from .transforms import Cutout, PMMCutout

__all__ = [
    "PMM",
    "Cutout",
    "FeatureMix",
    "PMMCutout",
    "PMMHeads",
    "add_pmm_config",
    "attentive_mask",
    "batch_drop_mask",
    "block_scores",
    "check_blocks",
    "cutmix_box_mask",
    "draw_negatives",
    "grad_cam",
    "hard_mix",
    "random_mask",
    "set_layer_stride",
    "topk_block_mask",
]
