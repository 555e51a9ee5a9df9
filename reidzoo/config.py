"""Configuration: fast-reid's defaults plus every registered ``add_*_config`` hook."""

import logging
import os

from fastreid.config import CfgNode
from fastreid.config import get_cfg as _fastreid_get_cfg

logger = logging.getLogger(__name__)

_CONFIG_HOOKS = []


def register_config(hook):
    """Register ``hook(cfg)`` to be run by :func:`get_cfg`; usable as a decorator.

    A hook adds its own nodes with :func:`add_node` and must be idempotent. Registering the
    same function twice is a no-op.

    Args:
        hook (callable): ``hook(cfg) -> None``.
    Returns:
        callable: ``hook`` itself.
    """
    if hook not in _CONFIG_HOOKS:
        _CONFIG_HOOKS.append(hook)
    return hook


def registered_config_hooks():
    """Returns:
    tuple[callable]: the hooks :func:`get_cfg` runs, in registration order."""
    return tuple(_CONFIG_HOOKS)


def add_node(cfg, path, defaults):
    """Add a config node at ``path`` without ever overwriting an existing key.

    Keys that already exist keep their value (so a hook can run twice, or after a YAML
    merge); a key that exists as a value where a node is wanted, or the reverse, is a
    conflict between two plugins and raises.

    Args:
        cfg (CfgNode): the root config (must not be frozen).
        path (str): dotted path of the node, e.g. ``"MODEL.IANET"``.
        defaults (dict | CfgNode): nested default values.
    Returns:
        CfgNode: the node at ``path``.
    """
    node = cfg
    for part in path.split("."):
        if part not in node:
            node[part] = CfgNode()
        elif not isinstance(node[part], CfgNode):
            raise KeyError(f"config key {path}: '{part}' already exists and is not a node")
        node = node[part]
    _merge_missing(node, defaults, path)
    return node


def _merge_missing(node, defaults, path):
    for key, value in defaults.items():
        full = f"{path}.{key}"
        if isinstance(value, dict):
            if key in node and not isinstance(node[key], CfgNode):
                raise KeyError(f"config key {full} already exists and is not a node")
            if key not in node:
                node[key] = CfgNode()
            _merge_missing(node[key], value, full)
        elif key not in node:
            node[key] = value
        elif isinstance(node[key], CfgNode):
            raise KeyError(f"config key {full} already exists as a node")


@register_config
def add_reidzoo_config(cfg):
    """reidzoo's own keys (the core, not any paper).

    Args:
        cfg (CfgNode): root config, modified in place.
    """
    add_node(
        cfg,
        "REIDZOO",
        {
            # Python modules imported before the config file is merged (third-party plugins).
            "CUSTOM_IMPORTS": [],
            # Loading MODEL.WEIGHTS that do not match the model raises instead of warning.
            "STRICT_LOAD": True,
            # Checkpoints (MODEL.WEIGHTS, --resume, --checkpoint) and ImageNet weights
            # (MODEL.BACKBONE.PRETRAIN_PATH) are read with torch.load(weights_only=True) and
            # reidzoo.checkpoint.SAFE_GLOBALS, so a file cannot run code; a file that needs
            # other Python objects is refused. False: the files are trusted legacy files,
            # unpickled completely (weights_only=False, with a warning).
            "WEIGHTS_ONLY": True,
            # Turn AMP off (with a warning) when the model runs on the CPU.
            "CPU_DISABLE_AMP": True,
            # DDP's find_unused_parameters, for models with branches unused in some steps.
            "FIND_UNUSED_PARAMETERS": False,
            # Seed for Python, numpy and torch RNGs (rank is added); negative: fast-reid's
            # default of a fresh random seed per run.
            "SEED": -1,
            # Periodic checkpoints (model_XXXX.pth) of this run kept on disk: when it writes
            # one more, the oldest it wrote is deleted. 0 keeps all (fast-reid's behaviour).
            # model_best, model_final and what last_checkpoint names are never deleted.
            "CHECKPOINT_KEEP": 0,
            # Iterations between the trainer's progress/ETA lines (fast-reid hard-codes 200).
            "LOG_PERIOD": 20,
            # Training diagnostics (README "Training diagnostics"; reidzoo.engine.diagnostics):
            # per-loss gradient norms at the last backbone stage, feature norms and attention
            # entropies into metrics.json / TensorBoard, at the first iteration and the last of
            # every PERIOD iterations. Off: no hook, no cost.
            "DIAGNOSTICS": {"ENABLED": False, "PERIOD": 20},
        },
    )
    # Dataset root; empty means $FASTREID_DATASETS, else "datasets" (fast-reid's rule).
    add_node(cfg, "DATASETS", {"ROOT": ""})
    # Transforms from TRANSFORM_REGISTRY, applied in order at their own stage.
    add_node(cfg, "INPUT", {"TRANSFORMS": []})
    # Iteration-based schedule: MAX_ITER > 0 trains that many iterations; STEPS, WARMUP_ITERS,
    # CHECKPOINT_PERIOD and TEST.EVAL_PERIOD are then counted in iterations, not epochs.
    add_node(cfg, "SOLVER", {"MAX_ITER": 0})
    # Modules from STAGE_MODULE_REGISTRY inserted after ResNet stages, as "layerK:Name".
    add_node(cfg, "MODEL.BACKBONE", {"INSERTS": []})


def get_cfg(imports=()):
    """fast-reid's default config extended by the config hooks of what is loaded.

    Imports reidzoo's core (:data:`reidzoo.plugins.CORE_MODULES`) and the modules in
    ``imports``, never a paper or plugin that nobody asked for: the config holds the nodes of
    the core and of every module imported so far in this process. The ``imports`` are added to
    ``REIDZOO.CUSTOM_IMPORTS``, so that a dump of the config loads them again.

    Args:
        imports (Iterable[str]): ``reidzoo.plugins`` entry-point names (``"pan"``) or module
            names (``"reidzoo.projects.pan"``), as in ``REIDZOO.CUSTOM_IMPORTS``.
    Returns:
        CfgNode: a fresh, unfrozen config.
    Raises:
        reidzoo.plugins.PluginImportError: an import names a plugin that fails to import.
        ImportError: an import names a module that cannot be imported.
    """
    from reidzoo.plugins import import_modules, load_core

    load_core()
    imports = list(imports or ())
    import_modules(imports)
    cfg = _fastreid_get_cfg()
    for hook in _CONFIG_HOOKS:
        hook(cfg)
    if imports:
        known = list(cfg.REIDZOO.CUSTOM_IMPORTS)
        cfg.REIDZOO.CUSTOM_IMPORTS = known + [n for n in imports if n not in known]
    return cfg


def dataset_root(cfg):
    """The dataset root for ``cfg``: ``DATASETS.ROOT``, else ``$FASTREID_DATASETS``, else
    ``datasets`` (fast-reid's rule)."""
    return cfg.DATASETS.ROOT or os.getenv("FASTREID_DATASETS", "datasets")


def setup_cfg(config_file="", opts=(), freeze=True):
    """Build a config from a YAML file and ``KEY VALUE`` overrides, the way ``train_net.py``
    does: the ``REIDZOO.CUSTOM_IMPORTS`` named in the file or the overrides are imported first.

    A key that nothing imported adds makes the next untried ``reidzoo.plugins`` entry point
    load (a broken one only warns), then the merge starts again on a fresh config; the
    plugins this needed are appended to ``REIDZOO.CUSTOM_IMPORTS`` of the result.

    Args:
        config_file (str): path to a YAML file (may use ``_BASE_``), or a registered model name
            (``demo-bagtricks-synthetic``, ``ianet-market1501``: see
            :func:`reidzoo.inference.registered_models`); empty for defaults.
        opts (list[str]): flat ``[KEY, VALUE, ...]`` overrides.
        freeze (bool): freeze the result.
    Returns:
        CfgNode
    Raises:
        FileNotFoundError: ``config_file`` looks like a path and does not exist.
        ValueError: ``config_file`` is neither a file nor a registered name (the message lists
            the names); an odd number of overrides.
        KeyError: a key no loaded module or plugin adds (the message names it and every
            plugin that failed to import).
        reidzoo.plugins.PluginImportError: ``REIDZOO.CUSTOM_IMPORTS`` names a plugin that
            fails to import.
    """
    from reidzoo.plugins import failures_note, load_next_plugin, loaded_plugins

    opts = list(opts or [])
    if len(opts) % 2:
        raise ValueError(f"config overrides must be KEY VALUE pairs, got an odd list: {opts}")
    config_file = resolve_config_file(config_file)
    imports = _custom_imports(config_file, opts)
    tried = []
    while True:
        cfg = get_cfg(imports=imports + tried)
        try:
            _merge(cfg, config_file, opts)
            break
        except KeyError as e:
            # A key that nothing loaded adds: import the next reidzoo.plugins entry point that
            # has not been tried (discovery), and merge again on a fresh config.
            name = load_next_plugin()
            if name is None:
                raise KeyError(f"{e.args[0] if e.args else e}{failures_note()}") from e
            if name in loaded_plugins():  # a broken one only warned: it adds no keys
                tried.append(name)
    if tried:  # record what the keys needed, so that a dump of cfg loads it again
        cfg.REIDZOO.CUSTOM_IMPORTS = list(cfg.REIDZOO.CUSTOM_IMPORTS) + [
            n for n in tried if n not in cfg.REIDZOO.CUSTOM_IMPORTS
        ]
    if freeze:
        cfg.freeze()
    return cfg


def _merge(cfg, config_file, opts):
    if config_file:
        cfg.merge_from_file(config_file)
    for key in opts[0::2]:
        node = cfg
        for part in key.split("."):
            if not isinstance(node, CfgNode) or part not in node:
                raise KeyError(f"unknown config key '{key}' in the KEY VALUE overrides")
            node = node[part]
    cfg.merge_from_list(opts)


def resolve_config_file(spec):
    """The YAML file of a config file path or a registered model name.

    Args:
        spec (str | os.PathLike): a file, a name from
            :func:`reidzoo.inference.registered_models`, or "" (returned as is).
    Returns:
        str: the file.
    Raises:
        FileNotFoundError, ValueError: see :func:`reidzoo.inference.resolve_config`.
    """
    spec = os.fspath(spec or "")
    if not spec or os.path.isfile(spec):
        return spec
    from reidzoo.inference import resolve_config

    return resolve_config(spec)


def _custom_imports(config_file, opts):
    names = []
    if config_file:
        raw = CfgNode.load_yaml_with_base(config_file, allow_unsafe=True)
        names += list((raw.get("REIDZOO") or {}).get("CUSTOM_IMPORTS") or [])
    for key, value in zip(opts[0::2], opts[1::2]):
        if key == "REIDZOO.CUSTOM_IMPORTS":
            import ast

            parsed = ast.literal_eval(value) if value.strip().startswith(("[", "(")) else value
            names += [parsed] if isinstance(parsed, str) else list(parsed)
    return names
