"""fast-reid's registries re-exported, plus reidzoo's own.

Registry names are global: prefix new components (``IANetBackbone``, ``PANHead``). A second
registration under a taken name is refused with :class:`RegistryClashError`, which names both
registrations (module, qualified name, file and line of each), in every registry listed here;
fast-reid's own refusal is a bare ``assert`` that names neither (and vanishes under ``-O``,
where the newcomer silently replaces the first).
"""

import inspect

from fastreid.data.datasets import DATASET_REGISTRY  # noqa: E402
from fastreid.modeling.backbones.build import BACKBONE_REGISTRY  # noqa: E402
from fastreid.modeling.heads.build import REID_HEADS_REGISTRY  # noqa: E402
from fastreid.modeling.meta_arch.build import META_ARCH_REGISTRY  # noqa: E402
from fastreid.utils.registry import Registry as _FastreidRegistry  # noqa: E402

HEADS_REGISTRY = REID_HEADS_REGISTRY


class RegistryClashError(AssertionError):
    """A registry name is registered twice; the message names both registrations.

    An ``AssertionError``, like fast-reid's own refusal, so code that catches that still works.
    """


def describe_registration(obj):
    """Where a registered object comes from, for error messages.

    Args:
        obj (object): a registered class or function.
    Returns:
        str: ``module.QualName (file:line)``, the location left out when it cannot be found.
    """
    name = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
    try:
        where = f"{inspect.getsourcefile(obj)}:{inspect.getsourcelines(obj)[1]}"
    except (OSError, TypeError):
        return name
    return f"{name} ({where})"


def check_unique(registry, name, obj):
    """Raise :class:`RegistryClashError` if ``name`` is taken in ``registry``.

    Args:
        registry (fastreid.utils.registry.Registry)
        name (str): the name ``obj`` is being registered under.
        obj (object): the newcomer.
    """
    if name not in registry._obj_map:
        return
    first = registry._obj_map[name]
    hint = (
        "the same object registered twice"
        if first is obj
        else "a module imported under two names, or two packages that chose the same name"
    )
    raise RegistryClashError(
        f"{registry._name} registry: the name '{name}' is already registered by "
        f"{describe_registration(first)}; refusing a second registration by "
        f"{describe_registration(obj)} ({hint}). Registry names are global: give the new one "
        f"another name, e.g. prefixed with its package's name."
    )


class Registry(_FastreidRegistry):
    """fast-reid's registry whose name clashes raise :class:`RegistryClashError`."""

    def _do_register(self, name, obj):
        check_unique(self, name, obj)
        super()._do_register(name, obj)


def _refuse_clashes(registry):
    """Give one of fast-reid's registry objects the clash error (that object only; fast-reid's
    ``Registry`` class and its other registries are left as they are)."""
    if getattr(registry, "_reidzoo_checks_clashes", False):
        return
    register = registry._do_register

    def _do_register(name, obj):
        check_unique(registry, name, obj)
        register(name, obj)

    registry._do_register = _do_register
    registry._reidzoo_checks_clashes = True


for _registry in (DATASET_REGISTRY, BACKBONE_REGISTRY, REID_HEADS_REGISTRY, META_ARCH_REGISTRY):
    _refuse_clashes(_registry)

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
    "RegistryClashError",
    "STAGE_MODULE_REGISTRY",
    "TRANSFORM_REGISTRY",
    "check_unique",
    "describe_registration",
]
