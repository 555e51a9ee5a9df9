"""PMM (arXiv 2007.08779): progressive multi-stage feature mix with attentive Hard-Mix.

Importing this package registers the meta-architecture ``PMM`` (``META_ARCH_REGISTRY``), the
tensor transform ``PMMCutout`` (``TRANSFORM_REGISTRY``), the image-level batch mixes
``PMMImageCutMix`` and ``PMMImageAttentiveCutMix`` (``IMAGE_MIX_REGISTRY``, selected by
``MODEL.PMM.IMAGE_MIX``), and adds ``cfg.MODEL.PMM`` and ``cfg.INPUT.PMM_CUTOUT``.
"""

from reidzoo.plugins import declare_maps

from .config import add_pmm_config
from .image_mix import (
    IMAGE_MIX_REGISTRY,
    PMMImageAttentiveCutMix,
    PMMImageCutMix,
    build_image_mix,
)
from .meta_arch import PMM, PMMHeads
from .modules import (
    PAPER_BLOCK_GRID,
    FeatureMix,
    attentive_mask,
    batch_drop_mask,
    block_scores,
    blocks_to_mask,
    check_blocks,
    cutmix_box_mask,
    draw_negatives,
    grad_cam,
    grid_block_size,
    hard_mix,
    random_mask,
    topk_block_mask,
)
from .transforms import Cutout, PMMCutout

# The map producer registers when reidzoo.visualize looks producers up: the model code never
# imports the visualisation layer.
declare_maps(__name__ + ".maps")

__all__ = [
    "IMAGE_MIX_REGISTRY",
    "PAPER_BLOCK_GRID",
    "PMM",
    "Cutout",
    "FeatureMix",
    "PMMCutout",
    "PMMHeads",
    "PMMImageAttentiveCutMix",
    "PMMImageCutMix",
    "add_pmm_config",
    "attentive_mask",
    "batch_drop_mask",
    "block_scores",
    "blocks_to_mask",
    "build_image_mix",
    "check_blocks",
    "cutmix_box_mask",
    "draw_negatives",
    "grad_cam",
    "grid_block_size",
    "hard_mix",
    "random_mask",
    "topk_block_mask",
]
