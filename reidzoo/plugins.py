"""Loading components that live outside reidzoo's core.

Two routes, both ending in a plain ``import`` that lets the module register itself:

* the entry-point group ``reidzoo.plugins`` (``[project.entry-points."reidzoo.plugins"]`` in a
  third party's ``pyproject.toml``); reidzoo's own paper packages use it too;
* ``REIDZOO.CUSTOM_IMPORTS``, a list of module names in a config file, imported before that
  config is merged so that the keys their config hooks add can be set in the same file.
"""

import importlib
import logging
from importlib import metadata

logger = logging.getLogger(__name__)

GROUP = "reidzoo.plugins"
CORE_MODULES = ("reidzoo.modeling", "reidzoo.data", "reidzoo.evaluation")
_LOADED = {}


def _entry_points():
    eps = metadata.entry_points()
    if hasattr(eps, "select"):
        return list(eps.select(group=GROUP))
    return list(eps.get(GROUP, []))  # Python < 3.10


def load_plugins():
    """Import every module registered in the ``reidzoo.plugins`` entry-point group, once.

    Returns:
        dict[str, module]: entry-point name -> imported module.
    """
    # reidzoo's own shared components register first.
    for core in CORE_MODULES:
        importlib.import_module(core)
    for ep in _entry_points():
        if ep.name in _LOADED:
            continue
        try:
            _LOADED[ep.name] = ep.load()
        except Exception as e:
            raise ImportError(
                f"reidzoo plugin '{ep.name}' ({ep.value}) failed to import: {e}"
            ) from e
        logger.debug("loaded reidzoo plugin %s (%s)", ep.name, ep.value)
    return dict(_LOADED)


def import_custom_modules(names):
    """Import the modules named in ``REIDZOO.CUSTOM_IMPORTS``.

    Args:
        names (Iterable[str]): importable module names.
    Returns:
        list[module]
    """
    modules = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"REIDZOO.CUSTOM_IMPORTS entries must be module names, got {name!r}")
        try:
            modules.append(importlib.import_module(name))
        except ImportError as e:
            raise ImportError(f"REIDZOO.CUSTOM_IMPORTS: cannot import module '{name}': {e}") from e
    return modules
