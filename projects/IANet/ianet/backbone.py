"""IANet's backbone: fast-reid's ResNet with IA blocks after stages or after every block."""

from torch import nn

from reidzoo.modeling.backbone import STAGES, Stage, build_staged_resnet
from reidzoo.registry import BACKBONE_REGISTRY

from .ia import ia_block_from_config


@BACKBONE_REGISTRY.register()
def build_ianet_backbone(cfg):
    """ResNet (``MODEL.BACKBONE``) with IA blocks.

    Blocks after stage outputs come from ``MODEL.BACKBONE.INSERTS`` (IANet: ``layer2`` and
    ``layer3``, §3.4); ``MODEL.IANET.EVERY_BLOCK_STAGES`` additionally follows every residual
    block of those stages with an IA block (Tab. 4f "stage23-c"). Those are added after the
    ImageNet weights are loaded, so the weights' key names are unaffected by them.

    Returns:
        reidzoo.modeling.StagedResNet
    """
    model = build_staged_resnet(cfg)
    channels_of = model.channels
    for stage in cfg.MODEL.IANET.EVERY_BLOCK_STAGES:
        if stage not in STAGES:
            raise ValueError(
                f"MODEL.IANET.EVERY_BLOCK_STAGES entry {stage!r}; expected one of {STAGES}"
            )
        layer, channels = getattr(model, stage), channels_of[stage]
        new = Stage(
            *[nn.Sequential(b, ia_block_from_config(cfg, stage, channels)) for b in layer.blocks()]
        )
        inserted = layer._modules.get("inserted")
        if inserted is not None:
            new.add_module("inserted", inserted)
        setattr(model, stage, new)
    return model
