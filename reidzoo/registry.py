"""fast-reid's registries re-exported, plus reidzoo's own.

Registry names are global: prefix new components (``IANetBackbone``, ``PANHead``).
"""

from reidzoo import compat

compat.apply()

from fastreid.data.datasets import DATASET_REGISTRY  # noqa: E402
from fastreid.modeling.backbones.build import BACKBONE_REGISTRY  # noqa: E402
from fastreid.modeling.heads.build import REID_HEADS_REGISTRY  # noqa: E402
from fastreid.modeling.meta_arch.build import META_ARCH_REGISTRY  # noqa: E402
from fastreid.utils.registry import Registry  # noqa: E402

HEADS_REGISTRY = REID_HEADS_REGISTRY

TRANSFORM_REGISTRY = Registry("TRANSFORM")
TRANSFORM_REGISTRY.__doc__ = """
Registry for image augmentations, spliced into fast-reid's transform pipeline.

An entry is a class or function called as ``obj(cfg, is_train)`` that returns a callable
transform, or ``None`` when its config disables it. It declares where it runs with the
attribute ``stage``: ``"pil"`` (before fast-reid's ToTensor, receives a PIL image) or
``"tensor"`` (after it, receives a float 0-255 [3, H, W] tensor). ``cfg.INPUT.TRANSFORMS``
lists the names to apply, in order. See :mod:`reidzoo.data.transforms`.
"""

STAGE_MODULE_REGISTRY = Registry("STAGE_MODULE")
STAGE_MODULE_REGISTRY.__doc__ = """
Registry for modules inserted after a ResNet stage by :mod:`reidzoo.modeling.backbone`.

An entry is called as ``obj(cfg, stage, in_channels)`` (``stage`` in layer1..layer4,
``in_channels`` the stage's output channels) and returns an ``nn.Module`` that maps
[N, C, H, W] to [N, C, H, W].
"""

__all__ = [
    "BACKBONE_REGISTRY",
    "DATASET_REGISTRY",
    "HEADS_REGISTRY",
    "META_ARCH_REGISTRY",
    "REID_HEADS_REGISTRY",
    "Registry",
    "STAGE_MODULE_REGISTRY",
    "TRANSFORM_REGISTRY",
]
