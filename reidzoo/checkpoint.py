"""Checkpoints that are never left half-written, and loading that says what did not match."""

import logging
import os
import tempfile

import torch
from fastreid.utils.checkpoint import Checkpointer as _Checkpointer

logger = logging.getLogger(__name__)


def atomic_write(path, write_fn, mode="wb"):
    """Write ``path`` through a temporary file in the same folder and ``os.replace`` it.

    A crash at any point leaves either the old file or the new one, never a truncated file.

    Args:
        path (str): destination.
        write_fn (callable): ``write_fn(fileobj)`` writes the content.
        mode (str): "wb" or "w".
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make checkpoints private
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's weights do not fit the model built from the config."""


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
    """fast-reid's Checkpointer with atomic saves and optional strict loading.

    Args:
        model, save_dir, save_to_disk, **checkpointables: as fast-reid's.
        strict (bool): loading raises :class:`CheckpointMismatchError` when the weights do
            not match the model exactly (missing, unexpected or reshaped keys).
    """

    def __init__(self, *args, strict=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.strict = strict

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
        return super().load(path, checkpointables)

    def _load_file(self, f):
        try:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=False)
        except Exception as e:
            raise RuntimeError(f"cannot read checkpoint '{f}': {e}") from e

    def _load_model(self, checkpoint):
        if self.strict:
            state = {
                (k[len("module.") :] if k.startswith("module.") else k): v
                for k, v in checkpoint["model"].items()
            }
            check_compatible(self.model.state_dict(), state, getattr(self, "_source", "?"))
        return super()._load_model(checkpoint)


def load_weights(model, path, strict=True):
    """Load model weights from a reidzoo/fast-reid checkpoint file.

    Args:
        model (nn.Module)
        path (str): a ``.pth`` written by the trainer (``{"model": state_dict, ...}``) or a bare
            state dict.
        strict (bool): raise :class:`CheckpointMismatchError` on any mismatch.
    Returns:
        nn.Module: ``model``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: '{path}' (MODEL.WEIGHTS)")
    ckpt = Checkpointer(model, strict=strict)
    ckpt._source = path
    data = ckpt._load_file(path)
    if not (isinstance(data, dict) and "model" in data):
        data = {"model": data}
    incompatible = ckpt._load_model(data)
    if incompatible is not None:
        ckpt._log_incompatible_keys(incompatible)
    return model
