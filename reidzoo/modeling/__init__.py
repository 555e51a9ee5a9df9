"""Modeling pieces shared by two or more papers."""

from .backbone import (  # noqa: E402
    STAGES,
    Stage,
    StagedResNet,
    build_staged_resnet,
    build_staged_resnet_backbone,
    load_pretrained,
    parse_inserts,
    set_stage_stride,
)
from .meta_arch import ReidMetaArch  # noqa: E402

__all__ = [
    "ReidMetaArch",
    "STAGES",
    "Stage",
    "StagedResNet",
    "build_staged_resnet",
    "build_staged_resnet_backbone",
    "load_pretrained",
    "parse_inserts",
    "set_stage_stride",
]
