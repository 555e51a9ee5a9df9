"""Loading components that live outside reidzoo's core: only what is asked for, failures isolated.

Nothing here runs at import time, and :func:`reidzoo.config.get_cfg` imports no paper and no
plugin. A config asks for what it needs in three ways, each ending in a plain ``import`` that
lets the module register itself:

* ``REIDZOO.CUSTOM_IMPORTS`` in a config file (every shipped paper config lists its package),
  imported before that file is merged so that the keys its config hooks add can be set in it;
* ``get_cfg(imports=[...])`` in code;
* a name the config uses (a config key, a meta-architecture, backbone, head, dataset or
  transform) that nothing loaded so far provides: the entry points of the group
  ``reidzoo.plugins`` (``[project.entry-points."reidzoo.plugins"]`` in a third party's
  ``pyproject.toml``; reidzoo's own paper packages use it too) are then imported one at a time,
  in name order, until the name is found (:func:`lookup`, :func:`load_next_plugin`).

The entry points are read without importing anything (:func:`available_plugins`: discovery).
A plugin that fails to import is reported once, as a :class:`PluginWarning` naming the plugin
and the error, and breaks nothing that does not use it; asking for it by name, or for a
component nothing else provides while it is broken, is an error naming the plugin and its
import error (:class:`PluginImportError`).

A package can also declare modules that only ``reidzoo.visualize`` needs (:func:`declare_maps`):
they are imported when the visualisation layer looks up its map producers, so that importing
the model code never imports the visualisation layer.
"""

import importlib
import logging
import sys
import warnings
from importlib import metadata

logger = logging.getLogger(__name__)

GROUP = "reidzoo.plugins"
#: reidzoo's own shared components (datasets, backbones, evaluators and their config hooks);
#: not plugins: :func:`load_core` imports them for every config.
CORE_MODULES = ("reidzoo.modeling", "reidzoo.data", "reidzoo.evaluation")

_LOADED = {}  # entry-point name -> module
_FAILED = {}  # entry-point name -> the exception its import raised
_MAP_MODULES = []  # modules declared with declare_maps, in declaration order


class PluginWarning(UserWarning):
    """A ``reidzoo.plugins`` entry point could not be imported (issued once per plugin)."""


class PluginImportError(ImportError):
    """A plugin that was asked for could not be imported; the message names it and the error."""


def available_plugins():
    """The entry points of the group ``reidzoo.plugins``, read without importing them.

    Returns:
        dict[str, str]: entry-point name -> module (``"pan" -> "reidzoo.projects.pan"``), sorted
        by name. Of two entry points with the same name, the first one found is kept.
    """
    return {name: ep.value for name, ep in _entry_points().items()}


def _entry_points():
    eps = metadata.entry_points()
    found = list(eps.select(group=GROUP)) if hasattr(eps, "select") else eps.get(GROUP, [])
    out = {}
    for ep in found:
        out.setdefault(ep.name, ep)
    return dict(sorted(out.items()))


def _describe(name, ep):
    dist = getattr(ep, "dist", None)
    source = f" of {dist.metadata['Name']} {dist.version}" if dist is not None else ""
    return f"reidzoo plugin '{name}' (entry point {name} = {ep.value}{source})"


def load_core():
    """Import reidzoo's own shared components (:data:`CORE_MODULES`), which every config has."""
    for core in CORE_MODULES:
        importlib.import_module(core)


def load_plugin(name, required=True):
    """Import one ``reidzoo.plugins`` entry point, once.

    Args:
        name (str): the entry-point name (``"pan"``).
        required (bool): True: a failure raises. False: a failure is reported once as a
            :class:`PluginWarning` and None is returned (discovery: nobody asked for it).
    Returns:
        module | None: the imported module; None when it failed and ``required`` is False.
    Raises:
        KeyError: no entry point has that name (the message lists them).
        PluginImportError: the plugin failed to import (now or before) and ``required``.
    """
    if name in _LOADED:
        return _LOADED[name]
    eps = _entry_points()
    if name not in eps:
        raise KeyError(
            f"no reidzoo plugin named '{name}'; entry points of the group '{GROUP}': "
            f"{', '.join(eps) or '(none)'}"
        )
    ep = eps[name]
    if name not in _FAILED:
        try:
            _LOADED[name] = ep.load()
            logger.debug("loaded %s", _describe(name, ep))
            return _LOADED[name]
        except Exception as e:  # any error: the plugin is broken, not the caller
            _FAILED[name] = e
            warnings.warn(
                f"{_describe(name, ep)} failed to import and is skipped: {type(e).__name__}: {e}",
                PluginWarning,
                stacklevel=2,
            )
    if required:
        err = _FAILED[name]
        raise PluginImportError(
            f"{_describe(name, ep)} was asked for but failed to import: {type(err).__name__}: {err}"
        ) from err
    return None


def load_next_plugin():
    """Import the first (by name) entry point not tried yet; a failure only warns.

    Returns:
        str | None: the name of the plugin tried (loaded or failed); None when every plugin
        has been tried.
    """
    for name in _entry_points():
        if name not in _LOADED and name not in _FAILED:
            load_plugin(name, required=False)
            return name
    return None


def load_plugins():
    """Import every ``reidzoo.plugins`` entry point not tried yet (failures only warn).

    Nothing in reidzoo calls this: configs load what they ask for. It is for tools that want
    every installed component registered (e.g. to list them).

    Returns:
        dict[str, module]: entry-point name -> module, for the plugins that imported.
    """
    load_core()
    while load_next_plugin() is not None:
        pass
    return dict(_LOADED)


def loaded_plugins():
    """Returns:
    dict[str, module]: name -> module of every plugin imported so far."""
    return dict(_LOADED)


def failed_plugins():
    """Returns:
    dict[str, str]: name -> ``"<Error>: <message>"`` of every plugin that failed to import."""
    return {n: f"{type(e).__name__}: {e}" for n, e in _FAILED.items()}


def failures_note():
    """A sentence naming the plugins that failed to import, for an error that a missing name
    raises; empty when none failed."""
    failed = failed_plugins()
    if not failed:
        return ""
    listed = "; ".join(f"'{n}' ({available_plugins().get(n, '?')}): {e}" for n, e in failed.items())
    return f". reidzoo plugins that failed to import and may provide it: {listed}"


def import_modules(names):
    """Import the modules a config asks for (``REIDZOO.CUSTOM_IMPORTS``, ``get_cfg(imports=)``).

    Each entry is a ``reidzoo.plugins`` entry-point name (``"pan"``) or an importable module
    name (``"reidzoo.projects.pan"``, ``"my_pkg.reid"``). A module that an entry point names
    is loaded through that entry point, so that a broken one is named as the plugin.

    Args:
        names (Iterable[str])
    Returns:
        list[module]
    Raises:
        ValueError: an entry is not a non-empty string.
        PluginImportError: an entry names a plugin that failed to import.
        ImportError: a module cannot be imported (the message names it).
    """
    modules = []
    eps = None
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"REIDZOO.CUSTOM_IMPORTS entries must be module names, got {name!r}")
        if name in sys.modules:
            modules.append(sys.modules[name])
            continue
        if eps is None:
            eps = available_plugins()
        by_value = [n for n, value in eps.items() if value == name]
        if name in eps or by_value:
            modules.append(load_plugin(name if name in eps else by_value[0]))
            continue
        try:
            modules.append(importlib.import_module(name))
        except ImportError as e:
            raise ImportError(f"REIDZOO.CUSTOM_IMPORTS: cannot import module '{name}': {e}") from e
    return modules


def lookup(registry, name, key=None):
    """``registry.get(name)``, importing untried plugins one at a time while it is missing.

    Args:
        registry (fastreid.utils.registry.Registry)
        name (str): the registered name a config asks for.
        key (str | None): the config key that names it, for the message.
    Returns:
        object: the registered class or function.
    Raises:
        KeyError: no loaded module and no plugin provides it; the message names the key, the
            registered names and every plugin that failed to import.
    """
    obj_map = registry._obj_map
    while name not in obj_map:
        if load_next_plugin() is None:
            where = f"{key}: " if key else ""
            known = ", ".join(sorted(obj_map)) or "(none)"
            raise KeyError(
                f"{where}no object named '{name}' in the '{registry._name}' registry; "
                f"registered names: {known}{failures_note()}"
            )
    return obj_map[name]


#: Config keys that name registered components: key -> (registry attribute of
#: :mod:`reidzoo.registry`, how the value holds names).
COMPONENT_KEYS = (
    ("MODEL.META_ARCHITECTURE", "META_ARCH_REGISTRY", "name"),
    ("MODEL.BACKBONE.NAME", "BACKBONE_REGISTRY", "name"),
    ("MODEL.HEADS.NAME", "HEADS_REGISTRY", "name"),
    ("MODEL.BACKBONE.INSERTS", "STAGE_MODULE_REGISTRY", "inserts"),
    ("INPUT.TRANSFORMS", "TRANSFORM_REGISTRY", "names"),
    ("DATASETS.NAMES", "DATASET_REGISTRY", "names"),
    ("DATASETS.TESTS", "DATASET_REGISTRY", "names"),
)


def resolve_components(cfg):
    """Make sure every component ``cfg`` names is registered, before anything is built.

    A missing name makes the untried ``reidzoo.plugins`` entry points load, one at a time,
    until it is found (:func:`lookup`).

    Args:
        cfg (CfgNode): a full config.
    Raises:
        KeyError: a name that nothing provides; the message names the key, the registered
            names and every plugin that failed to import.
    """
    from reidzoo import registry

    for key, attr, kind in COMPONENT_KEYS:
        node = cfg
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
            if node is None:
                break
        if node is None or node == "":
            continue
        if kind == "name":
            names = [node]
        elif kind == "inserts":  # "layer2:IANetIABlock"
            names = [str(v).split(":", 1)[-1] for v in node]
        else:
            names = list(node)
        for name in names:
            lookup(getattr(registry, attr), name, key)


def declare_maps(module):
    """Declare a module that registers explanatory-map producers, without importing it.

    ``reidzoo.visualize`` imports every declared module when it looks up a producer, so a
    paper package declares its ``maps`` module here instead of importing it (which would
    import the visualisation layer with the model code).

    Args:
        module (str): importable module name, e.g. ``"reidzoo.projects.ianet.maps"``.
    """
    if module not in _MAP_MODULES:
        _MAP_MODULES.append(module)


def load_map_modules():
    """Import every module declared with :func:`declare_maps` (once each).

    Returns:
        list[str]: the declared module names, in declaration order.
    """
    for module in list(_MAP_MODULES):
        if module not in sys.modules:
            importlib.import_module(module)
    return list(_MAP_MODULES)


def import_custom_modules(names):
    """The modules named in ``REIDZOO.CUSTOM_IMPORTS``: see :func:`import_modules`."""
    return import_modules(names)
