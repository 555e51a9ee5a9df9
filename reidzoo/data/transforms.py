"""Splicing registered augmentations into fast-reid's transform pipeline.

fast-reid's ``build_transforms(cfg, is_train)`` returns ``T.Compose([... PIL ops ...,
ToTensor(), ... tensor ops ...])``. Entries of :data:`reidzoo.registry.TRANSFORM_REGISTRY`
named in ``cfg.INPUT.TRANSFORMS`` are inserted just before ("pil") or just after ("tensor")
that ToTensor. The result is passed to fast-reid's loader builders through ``transforms=``.
"""

import torchvision.transforms as T
from fastreid.data.transforms import ToTensor, build_transforms

from reidzoo.plugins import lookup
from reidzoo.registry import TRANSFORM_REGISTRY

STAGES = ("pil", "tensor")


def build_registered_transforms(cfg, is_train):
    """Instantiate the transforms named in ``cfg.INPUT.TRANSFORMS``.

    Args:
        cfg (CfgNode)
        is_train (bool): training or test pipeline.
    Returns:
        dict[str, list[callable]]: stage -> transforms, in config order. A transform whose
        builder returns ``None`` (disabled for this pipeline) is left out.
    """
    out = {s: [] for s in STAGES}
    for name in cfg.INPUT.TRANSFORMS:
        builder = lookup(TRANSFORM_REGISTRY, name, "INPUT.TRANSFORMS")
        stage = getattr(builder, "stage", None)
        if stage not in STAGES:
            raise ValueError(
                f"transform '{name}' declares stage={stage!r}; expected one of {STAGES}"
            )
        transform = builder(cfg, is_train)
        if transform is not None:
            out[stage].append(transform)
    return out


def splice(base, extra):
    """Insert transforms around the ToTensor of a fast-reid pipeline.

    Args:
        base (T.Compose): fast-reid's pipeline; must contain exactly one ToTensor.
        extra (dict[str, list[callable]]): stage -> transforms, see
            :func:`build_registered_transforms`.
    Returns:
        T.Compose: a new pipeline (``base`` is not modified).
    """
    ops = list(base.transforms)
    idx = [i for i, t in enumerate(ops) if isinstance(t, (ToTensor, T.ToTensor))]
    if len(idx) != 1:
        raise ValueError(f"expected exactly one ToTensor in the pipeline, found {len(idx)}")
    i = idx[0]
    return T.Compose(ops[:i] + list(extra["pil"]) + [ops[i]] + list(extra["tensor"]) + ops[i + 1 :])


def build_transforms_with_registry(cfg, is_train=True):
    """fast-reid's transforms for ``cfg`` with the registered ones spliced in.

    Args:
        cfg (CfgNode)
        is_train (bool)
    Returns:
        T.Compose
    """
    return splice(
        build_transforms(cfg, is_train=is_train), build_registered_transforms(cfg, is_train)
    )
