"""Checkpoints that are never left half-written, loaded without running code from them, and
loading that says what did not match.

Every ``torch.load`` of a checkpoint or of ImageNet weights goes through :func:`load_file`:
``weights_only=True`` with the allow-list :data:`SAFE_GLOBALS`, so that a downloaded ``.pth``
cannot run code; a file needing anything else is refused (:class:`UnsafeCheckpointError`)
unless it is declared trusted (``REIDZOO.WEIGHTS_ONLY False``). Inference tools load trained
weights with one rule, :func:`load_for_inference`.
"""

import collections
import contextlib
import logging
import os
import pickle
import re
import tempfile

import torch
from fastreid.utils.checkpoint import Checkpointer as _Checkpointer

logger = logging.getLogger(__name__)

#: Prefix of :func:`atomic_write`'s temporary files (a killed write leaves one behind; the
#: trainer removes them at its next start).
TEMP_PREFIX = ".tmp-"

#: Python objects a fast-reid or reidzoo checkpoint holds beyond what torch's weights-only
#: loader accepts on its own (tensors, numbers, strings, bytes, lists, tuples, dicts, sets,
#: ``OrderedDict``): ``MultiStepLR`` keeps its milestones in a ``collections.Counter`` (recent
#: torch accepts it by default, older releases do not). Checked against checkpoints written by
#: fast-reid's own ``DefaultTrainer`` and by reidzoo's trainer (tests/test_safe_load.py).
SAFE_GLOBALS = (collections.Counter,)

_TRUST_HINT = (
    "If you trust this file (a legacy checkpoint you wrote yourself, say), load it with "
    "REIDZOO.WEIGHTS_ONLY False (in Python: trusted=True), which unpickles it completely."
)


def default_file_mode():
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the process umask.

    Returns:
        int: e.g. 0o644 under the usual umask 022.
    """
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path):
    """A temporary file beside ``path`` that replaces ``path`` when the block ends without error.

    The one atomic write of reidzoo (checkpoints, configs, results, feature files, gallery
    shards, faiss indexes, ONNX exports, PNGs): a crash at any point leaves either the old file
    or the new one, never a truncated file, and an error inside the block removes the
    temporary file and leaves ``path`` as it was. The temporary file is named
    ``<TEMP_PREFIX><random><basename>`` (so it keeps the destination's extension, and the
    trainer's start-up cleanup finds a left-over one) and gets :func:`default_file_mode`, not
    ``mkstemp``'s 0600, so results are as readable as a plain ``open`` would make them.

    Args:
        path (str | os.PathLike): destination; its folder is created if needed.
    Yields:
        str: the temporary file's path (an empty file; the caller writes or replaces it and
        closes it before the block ends).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=os.path.basename(path), dir=folder)
    os.close(fd)
    try:
        os.chmod(tmp, default_file_mode())
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # on disk before the rename, so a power cut cannot leave it empty
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path, write_fn, mode="wb"):
    """Write ``path`` through :func:`atomic_path` (fsynced, then renamed over ``path``).

    Args:
        path (str | os.PathLike): destination.
        write_fn (callable): ``write_fn(fileobj)`` writes the content.
        mode (str): "wb" or "w".
    """
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            write_fn(f)


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A file needs Python objects outside the weights-only allow-list to be unpickled.

    Attributes:
        path (str): the file.
        needed (list[str]): the globals it needs (``module.name``), as torch reports them.
    """

    def __init__(self, message, path, needed):
        super().__init__(message)
        self.path = path
        self.needed = list(needed)


class CheckpointReadError(OSError):
    """A file that cannot be read as a ``torch.save`` file (truncated, or something else)."""


def trusted_from_cfg(cfg):
    """Whether ``cfg`` declares its checkpoint files trusted (``REIDZOO.WEIGHTS_ONLY False``).

    Args:
        cfg (CfgNode | None): a config; one without a ``REIDZOO`` node is not trusted.
    Returns:
        bool
    """
    node = cfg.get("REIDZOO", None) if cfg is not None else None
    return node is not None and not bool(node.get("WEIGHTS_ONLY", True))


def _global_name(obj):
    return f"{obj.__module__}.{obj.__qualname__}"


def _needed_globals(path, error):
    """The globals outside the allow-list that ``path`` needs: from torch's scan of the pickle
    (zip-format files, nothing is executed), else from torch's error message."""
    names = []
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) files cannot be scanned; the message names one
        pass
    allowed = {_global_name(g) for g in SAFE_GLOBALS}
    names = [n for n in names if n not in allowed]
    if not names:
        names = re.findall(r"GLOBAL ([\w.]+)", str(error))
    return list(dict.fromkeys(names))


def load_file(path, trusted=False, what="checkpoint"):
    """Read a ``torch.save`` file without running code from it.

    The file is unpickled with ``weights_only=True``, allowing torch's plain types (tensors,
    numbers, strings, containers) and :data:`SAFE_GLOBALS` only, through the
    ``torch.serialization.safe_globals`` context manager (nothing is added process-wide).

    Args:
        path (str | os.PathLike): the file.
        trusted (bool): the caller trusts the file (``REIDZOO.WEIGHTS_ONLY False``): it is
            unpickled completely (``weights_only=False``, which can run any code the file
            holds), with a warning. For legacy files that hold other Python objects.
        what (str): what the file is, for messages ("checkpoint",
            "MODEL.BACKBONE.PRETRAIN_PATH", ...).
    Returns:
        object: what was saved, usually a dict (``{"model": state_dict, ...}`` or a state dict).
    Raises:
        FileNotFoundError: no such file.
        UnsafeCheckpointError: the file needs other Python objects; the message names the file
            and the globals, and how to load a trusted file.
        CheckpointReadError: the file cannot be read (truncated, not a ``torch.save`` file).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: '{path}'")
    if trusted:
        logger.warning(
            "loading %s '%s' with weights_only=False (REIDZOO.WEIGHTS_ONLY False): unpickling "
            "can run any code the file holds; do this only for files you trust",
            what,
            path,
        )
        try:
            return torch.load(path, map_location=torch.device("cpu"), weights_only=False)
        except Exception as e:
            raise CheckpointReadError(
                f"cannot read {what} '{path}' as a torch.save file ({type(e).__name__}: {e})"
            ) from e
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=torch.device("cpu"), weights_only=True)
    except pickle.UnpicklingError as e:
        needed = _needed_globals(path, e)
        if not needed and "weights only" not in str(e).lower():
            raise CheckpointReadError(
                f"cannot read {what} '{path}' as a torch.save file ({type(e).__name__}: {e})"
            ) from e
        if needed:
            reason = f"unpickling it needs the Python global(s) {', '.join(needed)}"
        else:  # refused for another construct than a global (torch's reason, last line)
            lines = [ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler" in ln]
            reason = f"torch's weights-only unpickler refused it ({(lines or [str(e)])[0]})"
        raise UnsafeCheckpointError(
            f"refusing to load {what} '{path}': {reason}, which the weights-only allow-list "
            "does not hold (tensors, numbers, strings, containers and "
            f"{', '.join(_global_name(g) for g in SAFE_GLOBALS)}: all that fast-reid and "
            "reidzoo checkpoints contain), and which could run arbitrary code. " + _TRUST_HINT,
            path,
            needed,
        ) from None
    except Exception as e:
        raise CheckpointReadError(
            f"cannot read {what} '{path}' as a torch.save file ({type(e).__name__}: {e})"
        ) from e


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's weights do not fit the model built from the config."""


LoadReport = collections.namedtuple("LoadReport", "source missing unexpected shapes")
LoadReport.__doc__ = """What one load put into a model, given to ``model.check_loaded(report)``.

A model whose training needs some weights from a checkpoint (PFE's frozen stage-II main branch)
defines ``check_loaded`` and raises there; the :class:`Checkpointer` calls it after every load
(``MODEL.WEIGHTS``, ``--resume``, :func:`load_for_inference`) and when nothing is loaded (an
empty ``MODEL.WEIGHTS`` in a new run: ``source`` is "" and every key is missing).

Fields:
    source (str): the file, "" when nothing was loaded.
    missing (tuple[str]): model keys the file does not hold.
    unexpected (tuple[str]): file keys the model does not have.
    shapes (tuple[tuple[str, tuple, tuple]]): (key, file shape, model shape) of the keys left
        at their initial value because their shapes differ.
"""


def _report_loaded(model, report):
    """Call ``model.check_loaded(report)`` when the model defines it."""
    check = getattr(model, "check_loaded", None)
    if callable(check):
        check(report)


def check_compatible(model_state, ckpt_state, source):
    """Raise :class:`CheckpointMismatchError` listing what does not match.

    Args:
        model_state (dict): the model's ``state_dict()``.
        ckpt_state (dict): the checkpoint's model weights (``module.`` prefix removed).
        source (str): file name, for the message.
    """
    missing = sorted(k for k in model_state if k not in ckpt_state)
    unexpected = sorted(k for k in ckpt_state if k not in model_state)
    shapes = sorted(
        f"{k}: checkpoint {tuple(ckpt_state[k].shape)} vs model {tuple(model_state[k].shape)}"
        for k in model_state
        if k in ckpt_state
        and model_state[k].numel() > 0  # NUM_CLASSES 0: a classifier not sized yet
        and hasattr(ckpt_state[k], "shape")
        and tuple(ckpt_state[k].shape) != tuple(model_state[k].shape)
    )
    if missing or unexpected or shapes:

        def _fmt(title, items):
            if not items:
                return ""
            head = ", ".join(items[:20]) + (
                f", ... ({len(items)} in all)" if len(items) > 20 else ""
            )
            return f"\n  {title} ({len(items)}): {head}"

        raise CheckpointMismatchError(
            f"checkpoint '{source}' does not match the model built from the config"
            + _fmt("missing keys", missing)
            + _fmt("unexpected keys", unexpected)
            + _fmt("shape mismatches", shapes)
            + "\n  (was it trained with another config? set REIDZOO.STRICT_LOAD False to load"
            " the matching part only)"
        )


class Checkpointer(_Checkpointer):
    """fast-reid's Checkpointer with atomic saves, weights-only reads and optional strict
    loading.

    Args:
        model, save_dir, save_to_disk, **checkpointables: as fast-reid's.
        strict (bool): loading raises :class:`CheckpointMismatchError` when the weights do
            not match the model exactly (missing, unexpected or reshaped keys).
        trusted (bool): files are unpickled completely (``REIDZOO.WEIGHTS_ONLY False``);
            by default they are read by :func:`load_file` without running code.
    """

    def __init__(self, *args, strict=False, trusted=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.strict = strict
        self.trusted = trusted

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_write(save_file, lambda f: torch.save(data, f))
        if name != "model_best":  # a copy of an earlier state: resume continues from the latest
            self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename):
        atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename),
            mode="w",
        )

    def load(self, path, checkpointables=None):
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: '{path}' (MODEL.WEIGHTS)")
        self._source = path
        if not path:  # nothing to load: a model that needs weights refuses before any step
            own = tuple(self.model.state_dict())
            _report_loaded(self.model, LoadReport("", own, (), ()))
        return super().load(path, checkpointables)

    def _load_file(self, f):
        return load_file(f, trusted=self.trusted)

    def _load_model(self, checkpoint):
        state = _strip_module(checkpoint["model"])
        source = getattr(self, "_source", "?")
        own = self.model.state_dict()
        if self.strict:
            check_compatible(own, state, source)
        # A zero-size tensor (a classifier built with MODEL.HEADS.NUM_CLASSES 0) has nothing to
        # load: leave it out quietly instead of fast-reid's "Skip loading parameter" warning.
        empty = sorted(
            k
            for k, v in state.items()
            if k in own
            and own[k].numel() == 0
            and tuple(getattr(v, "shape", ())) != tuple(own[k].shape)
        )
        if empty:
            logger.info(
                "'%s': classifier %s not loaded: the model has no classes "
                "(MODEL.HEADS.NUM_CLASSES 0), and the classifier is not needed for features",
                source,
                ", ".join(empty),
            )
            state = _with_metadata(
                state, collections.OrderedDict((k, v) for k, v in state.items() if k not in empty)
            )
        checkpoint["model"] = state
        incompatible = super()._load_model(checkpoint)
        reshaped = {k for k, _, _ in incompatible.incorrect_shapes}
        _report_loaded(
            self.model,
            LoadReport(
                source,
                tuple(k for k in incompatible.missing_keys if k not in reshaped),
                tuple(incompatible.unexpected_keys),
                tuple(incompatible.incorrect_shapes),
            ),
        )
        return incompatible


def _unprefixed(key):
    return key[len("module.") :] if key.startswith("module.") else key


def _with_metadata(source, state):
    """``state`` with the module-version ``_metadata`` of ``source`` (as ``state_dict()`` keeps
    it, for ``load_state_dict``), keys without the ``module.`` prefix."""
    meta = getattr(source, "_metadata", None)
    if meta is not None:
        state._metadata = collections.OrderedDict(
            ("" if k == "module" else _unprefixed(k), v) for k, v in meta.items()
        )
    return state


def _strip_module(state):
    """A copy of ``state`` without the ``module.`` prefix (DistributedDataParallel) on its keys."""
    if not isinstance(state, dict):
        raise ValueError(f"a checkpoint's 'model' must be a state dict, got {type(state).__name__}")
    return _with_metadata(
        state, collections.OrderedDict((_unprefixed(k), v) for k, v in state.items())
    )


def load_weights(model, path, strict=True, trusted=False):
    """Load model weights from a reidzoo/fast-reid checkpoint file.

    Args:
        model (nn.Module)
        path (str): a ``.pth`` written by the trainer (``{"model": state_dict, ...}``) or a bare
            state dict.
        strict (bool): raise :class:`CheckpointMismatchError` on any mismatch.
        trusted (bool): unpickle the file completely (see :func:`load_file`).
    Returns:
        nn.Module: ``model``.
    Raises:
        FileNotFoundError, UnsafeCheckpointError, CheckpointReadError: see :func:`load_file`.
        CheckpointMismatchError: ``strict`` and the weights do not fit ``model``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: '{path}' (MODEL.WEIGHTS)")
    _load_state(model, _model_state(load_file(path, trusted=trusted)), path, strict)
    return model


def _model_state(data):
    """The model weights of what a checkpoint file holds (``{"model": ...}`` or a state dict),
    without ``module.`` prefixes."""
    if isinstance(data, dict) and "model" in data:
        data = data["model"]
    return _strip_module(data)


def _load_state(model, state, source, strict):
    ckpt = Checkpointer(model, strict=strict)
    ckpt._source = source
    incompatible = ckpt._load_model({"model": state})
    if incompatible is not None:
        ckpt._log_incompatible_keys(incompatible)


def _shapes(state):
    return {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}


def _class_count(own, state):
    """The number of classes the checkpoint's classifier has, guessed from the tensors that do
    not fit the model (their first dimension); 0 when the checkpoint only lacks some of the
    model's tensors; None when the misfits disagree (then it is not the classifier)."""
    dims = {
        shape[0]
        for k, shape in state.items()
        if len(shape) >= 1 and own.get(k) != shape  # unexpected or reshaped
    }
    if not dims and any(k not in state for k in own):
        dims = {0}
    return int(dims.pop()) if len(dims) == 1 else None


def _summarize_keys(keys, limit=4):
    keys = sorted(keys)
    more = f", ... ({len(keys)} tensors)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_for_inference(cfg, build_model=None, weights=None):
    """Build the model of ``cfg`` and load a trained checkpoint into it, to compute features.

    The one rule of every tool that uses a trained model (``train_net.py --eval-only``,
    ``reidzoo.extract``, ``reidzoo.export``, ``reidzoo.visualize ranks`` and ``maps``):

    * The file is read by :func:`load_file` (weights only, unless ``REIDZOO.WEIGHTS_ONLY``
      False), before any model is built.
    * No ImageNet initialisation (``MODEL.BACKBONE.PRETRAIN`` False): every weight comes from
      the checkpoint, and ImageNet weights need not exist.
    * The classifier is sized from the checkpoint. The trainer sets
      ``MODEL.HEADS.NUM_CLASSES`` from the training set, while a paper's config file says 0, so
      the model the config builds has no classifier (RMGL, PFE, PMM) or an empty one (the
      baseline, IANet, PAN). When the checkpoint does not fit that model, the model is built
      again with the number of classes the checkpoint's misfitting tensors have; if that model
      fits the checkpoint exactly, it is the one used (one INFO line: the classifier is not
      needed for features, but it is loaded, so PMM's Grad-CAM maps can use it).
    * Anything else that does not fit (another backbone or depth, a missing module) raises
      :class:`CheckpointMismatchError` listing the keys when ``REIDZOO.STRICT_LOAD`` is True
      (the default); with False the matching part is loaded, as fast-reid does.

    Args:
        cfg (CfgNode): a full config (frozen or not; it is not modified).
        build_model (callable | None): ``build_model(cfg) -> nn.Module``; None: reidzoo's
            :func:`reidzoo.modeling.build.build_model` (``train_net.py --eval-only`` passes its
            trainer's).
        weights (str | None): the checkpoint; None: ``MODEL.WEIGHTS``.
    Returns:
        tuple[nn.Module, CfgNode]: the model with the weights loaded (its train/eval mode as
        built) and the frozen config it was built from (``MODEL.WEIGHTS`` the file,
        ``MODEL.BACKBONE.PRETRAIN`` False, ``MODEL.HEADS.NUM_CLASSES`` the checkpoint's).
    Raises:
        ValueError: no checkpoint given.
        FileNotFoundError, UnsafeCheckpointError, CheckpointReadError: see :func:`load_file`.
        CheckpointMismatchError: see above.
    """
    if build_model is None:
        from reidzoo.modeling.build import build_model
    path = os.fspath(cfg.MODEL.WEIGHTS if weights is None else weights)
    if not path:
        raise ValueError("no checkpoint to load: MODEL.WEIGHTS is empty")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: '{path}' (MODEL.WEIGHTS)")
    node = cfg.get("REIDZOO", None)
    strict = bool(node.get("STRICT_LOAD", True)) if node is not None else True
    state = _model_state(load_file(path, trusted=trusted_from_cfg(cfg)))

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = path
    cfg.MODEL.BACKBONE.PRETRAIN = False
    model = build_model(cfg)
    own, theirs = _shapes(model.state_dict()), _shapes(state)
    classes = _class_count(own, theirs) if own != theirs else None
    if classes is not None and classes != cfg.MODEL.HEADS.NUM_CLASSES:
        trial_cfg = cfg.clone()
        trial_cfg.MODEL.HEADS.NUM_CLASSES = classes
        trial = build_model(trial_cfg)
        trial_own = _shapes(trial.state_dict())
        if trial_own == theirs:  # only the classifier differed: use the checkpoint's
            changed = {k for k in set(own) | set(trial_own) if own.get(k) != trial_own.get(k)}
            logger.info(
                "MODEL.HEADS.NUM_CLASSES %d -> %d from the classifier in '%s' (%s), so that "
                "the whole checkpoint loads; the classifier is not needed for features",
                cfg.MODEL.HEADS.NUM_CLASSES,
                classes,
                path,
                _summarize_keys(changed),
            )
            model, cfg = trial, trial_cfg
    _load_state(model, state, path, strict)
    cfg.freeze()
    return model, cfg
