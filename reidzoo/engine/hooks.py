"""Trainer hooks for exact resume, consistent ranks and a final checkpoint that is never lost."""

import logging
import os

import torch
from fastreid.engine import hooks as fr_hooks
from fastreid.utils import comm

from reidzoo.data.stream import EPOCH_TAG, derive_seed, seed_global_rngs

logger = logging.getLogger(__name__)


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


class EpochSeed(fr_hooks.HookBase):
    """Seeds the global Python, numpy and torch generators (CUDA's too) at every epoch start
    from ``(run seed, rank, epoch)``.

    The model's random numbers (dropout, mixing, random shifts) then depend only on the epoch
    and what happens in it, so a run resumed at an epoch boundary continues exactly as the
    uninterrupted one, on every rank, without storing generator states in the checkpoint.
    """

    def before_epoch(self):
        t = self.trainer
        seed = derive_seed(t.seed, EPOCH_TAG, comm.get_rank(), t.epoch)
        seed_global_rngs(seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)


def sync_buffers(model):
    """Make every rank's buffers (BatchNorm running statistics, ...) equal: floating buffers
    become their mean over ranks, the others rank 0's.

    Args:
        model (nn.Module): the (possibly DDP-wrapped) model; a no-op in one process.
    """
    if comm.get_world_size() == 1:
        return
    import torch.distributed as dist

    buffers = [b for b in _unwrap(model).buffers() if b.numel()]
    floats = [b for b in buffers if b.is_floating_point()]
    others = [b for b in buffers if not b.is_floating_point()]
    with torch.no_grad():
        for group, average in ((floats, True), (others, False)):
            if not group:
                continue
            flat = torch.cat([b.detach().reshape(-1).to(group[0].dtype) for b in group])
            if average:
                dist.all_reduce(flat)
                flat /= comm.get_world_size()
            # Every rank takes rank 0's result, so the reduction order cannot make them differ.
            dist.broadcast(flat, src=0)
            offset = 0
            for b in group:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()


class BufferSync(fr_hooks.HookBase):
    """At every epoch end, before evaluation and checkpointing, give all ranks the same buffers.

    DDP keeps parameters equal but (``broadcast_buffers=False``) lets each rank's BatchNorm
    statistics follow its own batches; the evaluation (split between ranks) and the checkpoint
    (rank 0's) then see different models. The running means averaged over ranks are exactly the
    running means over the union of their batches.
    """

    def after_epoch(self):
        sync_buffers(self.trainer.model)


class FinalCheckpoint(fr_hooks.HookBase):
    """Writes ``model_final`` at the end of the last epoch, *before* the final evaluation, so a
    failing evaluation never costs the trained model."""

    def __init__(self, checkpointer):
        self.checkpointer = checkpointer

    def after_epoch(self):
        t = self.trainer
        if t.epoch >= t.max_epoch - 1:
            self.checkpointer.save("model_final", epoch=t.epoch, **t.checkpoint_state())


class PeriodicCheckpointer(fr_hooks.PeriodicCheckpointer):
    """fast-reid's periodic checkpointer (``model_XXXX`` every period, ``model_best`` by the
    latest metric), with the run state the trainer needs for exact resume, and without writing
    ``model_final`` (:class:`FinalCheckpoint` did, before the final evaluation).

    Args:
        keep (int): periodic checkpoints of this run kept on disk (``REIDZOO.CHECKPOINT_KEEP``);
            after each new one the oldest this run wrote beyond ``keep`` is deleted; 0 keeps
            all. Files of an earlier run (before ``--resume``), ``model_best`` and
            ``model_final`` are never deleted.
    """

    def __init__(self, checkpointer, period, keep=0):
        super().__init__(checkpointer, period)
        self.keep = int(keep)
        if self.keep < 0:
            raise ValueError(f"REIDZOO.CHECKPOINT_KEEP={keep}: expected 0 (keep all) or more")
        self._written = []

    def before_train(self):
        super().before_train()
        self.best_metric = getattr(self.trainer, "best_metric", -1)

    def after_epoch(self):
        from fastreid.utils.events import get_event_storage

        t = self.trainer
        epoch = int(t.epoch)
        latest = get_event_storage().latest()
        metric = latest[self.metric_name][0] if self.metric_name in latest else -1
        periodic = (epoch + 1) % self.period == 0
        final = epoch >= self.max_epoch - 1
        if not (periodic or final):
            return
        if metric > self.best_metric:
            self.best_metric = metric
            t.best_metric = metric
            self.checkpointer.save("model_best", epoch=epoch, metric=metric, **t.checkpoint_state())
        if periodic and not final:
            name = f"model_{epoch:04d}"
            self.checkpointer.save(name, epoch=epoch, metric=metric, **t.checkpoint_state())
            self._written.append(os.path.join(self.checkpointer.save_dir, name + ".pth"))
            while self.keep and len(self._written) > self.keep:
                old = self._written.pop(0)
                if os.path.isfile(old):
                    os.remove(old)
