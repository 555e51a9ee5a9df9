"""Learning-rate schedules counted from the start of training, and the tool that prints them.

fast-reid 1.4.0 steps its main scheduler only once warmup is over, so every ``SOLVER.STEPS``
milestone is shifted by the warmup length, and its cosine ``T_max`` is computed from
``MAX_EPOCH`` even in iteration mode. reidzoo's :class:`AbsoluteLR` is one scheduler, stepped
after every iteration, whose learning rate is a function of the absolute iteration:

* ``unit``: an epoch (``it // iters_per_epoch``), or an iteration when ``SOLVER.MAX_ITER > 0``;
* warmup: fast-reid's factor (``WARMUP_METHOD``/``WARMUP_FACTOR``), over the first
  ``SOLVER.WARMUP_ITERS`` iterations in both modes, multiplied onto the main schedule;
* ``MultiStepLR``: ``BASE_LR * GAMMA ** (number of STEPS <= unit)``: STEPS are absolute, warmup
  included, as papers write their recipes (``STEPS [30, 50]``: the rate drops at the start of
  epochs 30 and 50, counted from 0);
* ``CosineAnnealingLR``: constant until the post-warmup span starts (the first unit after warmup,
  or ``SOLVER.DELAY_EPOCHS`` if later), then ``ETA_MIN_LR + (BASE_LR - ETA_MIN_LR) *
  (1 + cos(pi * k / n)) / 2`` for the ``k``-th of the span's ``n`` units, so that it reaches
  ``ETA_MIN_LR`` exactly when training ends and never climbs back.

``python -m reidzoo.schedule --config-file CFG [--iters-per-epoch N] [KEY VALUE ...]`` runs the
trainer's own optimizer, scheduler and learning-rate hook through fast-reid's training loop (with
a step that does nothing) and prints the learning rate at every epoch (or iteration) where it
changes; its last line is ``{"unit": "epoch"|"iter", "lr": {"<unit>": lr, ...}}``.
"""

import argparse
import bisect
import json
import logging
import math
import sys
import warnings

import torch
from fastreid.engine import hooks as fr_hooks
from fastreid.solver.lr_scheduler import _get_warmup_factor_at_epoch

logger = logging.getLogger(__name__)

SCHEDULES = ("MultiStepLR", "CosineAnnealingLR")


class AbsoluteLR(torch.optim.lr_scheduler.LRScheduler):
    """Warmup times a multi-step or cosine schedule, as a function of the absolute iteration.

    ``last_epoch`` counts iterations: the rate in force during iteration ``it`` (0-based) is
    :meth:`lr_at` ``(base_lr, it)``. Step it once after every iteration.

    Args:
        optimizer (Optimizer)
        sched (str): "MultiStepLR" or "CosineAnnealingLR".
        iters_per_epoch (int): 1 in iteration mode.
        total_units (int): ``MAX_EPOCH`` (epoch mode) or ``MAX_ITER`` (iteration mode).
        milestones (list[int]): absolute units where MultiStepLR multiplies by ``gamma``.
        gamma (float)
        warmup_iters (int): iterations of warmup (0: none).
        warmup_factor (float)
        warmup_method (str): fast-reid's "linear", "constant" or "exp".
        delay_units (int): cosine stays at the base rate until this unit.
        eta_min (float): cosine's final rate.
    """

    def __init__(
        self,
        optimizer,
        *,
        sched,
        iters_per_epoch,
        total_units,
        milestones=(),
        gamma=0.1,
        warmup_iters=0,
        warmup_factor=0.1,
        warmup_method="linear",
        delay_units=0,
        eta_min=0.0,
        last_epoch=-1,
    ):
        if sched not in SCHEDULES:
            raise ValueError(f"SOLVER.SCHED '{sched}': expected one of {SCHEDULES}")
        if iters_per_epoch < 1 or total_units < 1:
            raise ValueError(
                f"a schedule needs iters_per_epoch >= 1 and at least one epoch/iteration, got "
                f"iters_per_epoch={iters_per_epoch}, total={total_units}"
            )
        if list(milestones) != sorted(milestones):
            raise ValueError(f"SOLVER.STEPS must be increasing, got {list(milestones)}")
        self.sched = sched
        self.iters_per_epoch = int(iters_per_epoch)
        self.total_units = int(total_units)
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        self.warmup_method = str(warmup_method)
        warmup_units = math.ceil(self.warmup_iters / self.iters_per_epoch)
        self.cosine_start = max(warmup_units, int(delay_units))
        self.eta_min = float(eta_min)
        super().__init__(optimizer, last_epoch)

    def unit_of(self, it):
        """The epoch (or, in iteration mode, the iteration) that iteration ``it`` belongs to."""
        return it // self.iters_per_epoch

    def lr_at(self, base_lr, it):
        """The rate of a group whose base rate is ``base_lr`` during iteration ``it``.

        Args:
            base_lr (float)
            it (int): 0-based iteration.
        Returns:
            float
        """
        warm = 1.0
        if it < self.warmup_iters:
            warm = _get_warmup_factor_at_epoch(
                self.warmup_method, it, self.warmup_iters, self.warmup_factor
            )
        unit = self.unit_of(it)
        if self.sched == "MultiStepLR":
            return base_lr * warm * self.gamma ** bisect.bisect_right(self.milestones, unit)
        span = self.total_units - self.cosine_start
        if unit < self.cosine_start or span <= 0:
            return base_lr * warm
        k = min(unit - self.cosine_start, span)
        cos = (1 + math.cos(math.pi * k / span)) / 2
        return (self.eta_min + (base_lr - self.eta_min) * cos) * warm

    def get_lr(self):
        it = max(self.last_epoch, 0)
        # fast-reid makes one group per parameter (hundreds) sharing a few base rates: compute
        # each distinct rate once per step.
        rates = {base: self.lr_at(base, it) for base in set(self.base_lrs)}
        return [rates[base] for base in self.base_lrs]

    def _get_closed_form_lr(self):
        return self.get_lr()

    def load_state_dict(self, state_dict):
        if "sched" not in state_dict:
            raise ValueError(
                "the checkpoint's learning-rate scheduler state was written by another scheduler "
                f"(keys: {sorted(state_dict)}); reidzoo's absolute schedule cannot resume it "
                "exactly. Start a new run from its weights with MODEL.WEIGHTS instead."
            )
        # The position (iteration count, last rates) comes from the checkpoint; the schedule
        # itself stays the config's, so a resumed run with, e.g., more epochs follows the new
        # schedule instead of silently keeping the old one.
        changed = [
            f"{k}: checkpoint {state_dict[k]!r}, config {getattr(self, k)!r}"
            for k in _SCHEDULE_KEYS
            if k in state_dict and state_dict[k] != getattr(self, k)
        ]
        if changed:
            logger.warning("Resuming with another schedule than the checkpoint's: %s", changed)
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in _SCHEDULE_KEYS})


#: What defines an :class:`AbsoluteLR` schedule (as opposed to its position in it).
_SCHEDULE_KEYS = (
    "sched",
    "iters_per_epoch",
    "total_units",
    "milestones",
    "gamma",
    "warmup_iters",
    "warmup_factor",
    "warmup_method",
    "cosine_start",
    "eta_min",
)


def build_lr_scheduler(cfg, optimizer, iters_per_epoch):
    """The trainer's schedulers, as fast-reid's dict ``{"lr_sched": AbsoluteLR}``.

    Args:
        cfg (CfgNode): ``SOLVER.*``.
        optimizer (Optimizer)
        iters_per_epoch (int): 1 in iteration mode (``SOLVER.MAX_ITER > 0``).
    Returns:
        dict[str, LRScheduler]
    """
    s = cfg.SOLVER
    iteration_mode = s.MAX_ITER > 0
    sched = AbsoluteLR(
        optimizer,
        sched=s.SCHED,
        iters_per_epoch=1 if iteration_mode else iters_per_epoch,
        total_units=s.MAX_ITER if iteration_mode else s.MAX_EPOCH,
        milestones=list(s.STEPS),
        gamma=s.GAMMA,
        warmup_iters=s.WARMUP_ITERS,
        warmup_factor=s.WARMUP_FACTOR,
        warmup_method=s.WARMUP_METHOD,
        delay_units=s.DELAY_EPOCHS,
        eta_min=s.ETA_MIN_LR,
    )
    return {"lr_sched": sched}


class LRSchedulerHook(fr_hooks.LRScheduler):
    """fast-reid's LR hook (same summary of the largest group's rate into ``lr``) stepping
    :class:`AbsoluteLR` after every iteration and never at epoch ends.

    Unlike fast-reid, a step skipped by AMP's grad scaler still advances the schedule: the rate
    is a function of the iteration, not of how many optimizer steps were taken.
    """

    def before_step(self):
        pass

    def after_step(self):
        lr = self._optimizer.param_groups[self._best_param_group_id]["lr"]
        self.trainer.storage.put_scalar("lr", lr, smoothing_hint=False)
        self._scheduler["lr_sched"].step()

    def after_epoch(self):
        pass


# --------------------------------------------------------------------------------------------
# python -m reidzoo.schedule
# --------------------------------------------------------------------------------------------
class _Recorder(fr_hooks.HookBase):
    """Records the rate of one parameter group in force at every iteration."""

    def __init__(self, optimizer, group, iteration_mode):
        self.optimizer = optimizer
        self.group = group
        self.iteration_mode = iteration_mode
        self.changes = {}
        self._last = None

    def before_step(self):
        t = self.trainer
        if not self.iteration_mode and t.iter % t.iters_per_epoch:
            return  # epoch mode: the rate at each epoch's first iteration
        lr = self.optimizer.param_groups[self.group]["lr"]
        if self._last is None or not math.isclose(lr, self._last, rel_tol=1e-12, abs_tol=0.0):
            self.changes[t.iter if self.iteration_mode else t.epoch] = lr
            self._last = lr


def schedule_table(cfg, iters_per_epoch=None, trainer_cls=None):
    """The base learning rate at every unit where it changes, from the trainer's own objects.

    Builds the model and optimizer as the trainer does, the schedulers with its
    ``build_lr_scheduler`` and the learning-rate hook it registers, and runs them through
    fast-reid's training loop with a step that computes nothing.

    Args:
        cfg (CfgNode)
        iters_per_epoch (int | None): iterations per epoch; None: from the training set
            (``len // SOLVER.IMS_PER_BATCH``, as the trainer). Ignored in iteration mode.
        trainer_cls (type | None): default :class:`reidzoo.engine.ReidTrainer`.
    Returns:
        dict: ``{"unit": "epoch"|"iter", "lr": {unit: lr}}`` holding the first value and
        every change, for the parameter group trained at ``SOLVER.BASE_LR``.
    """
    from fastreid.engine.train_loop import TrainerBase

    from reidzoo.engine.trainer import ReidTrainer, prepare_cfg

    trainer_cls = trainer_cls or ReidTrainer
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"  # nothing is computed
    cfg = prepare_cfg(cfg)
    cfg.MODEL.BACKBONE.PRETRAIN = False
    iteration_mode = cfg.SOLVER.MAX_ITER > 0
    if iteration_mode:
        iters_per_epoch, max_epoch = 1, cfg.SOLVER.MAX_ITER
    else:
        max_epoch = cfg.SOLVER.MAX_EPOCH
        num_classes = None
        if iters_per_epoch is None:
            num_images, num_classes = _train_set_size(cfg)
            iters_per_epoch = num_images // cfg.SOLVER.IMS_PER_BATCH
            if iters_per_epoch < 1:
                raise ValueError(
                    f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} is larger than the "
                    f"training set ({num_images} images)"
                )
        if num_classes:
            cfg.MODEL.HEADS.NUM_CLASSES = num_classes
    if iters_per_epoch < 1:
        raise ValueError(f"--iters-per-epoch must be >= 1, got {iters_per_epoch}")
    if cfg.MODEL.HEADS.NUM_CLASSES <= 0:
        cfg.MODEL.HEADS.NUM_CLASSES = 2  # the classifier's size does not change any rate
    model = trainer_cls.build_model(cfg)
    optimizer, _ = trainer_cls.build_optimizer(cfg, model)
    scheduler = trainer_cls.build_lr_scheduler(cfg, optimizer, iters_per_epoch)
    base = cfg.SOLVER.BASE_LR
    group = next(
        (i for i, g in enumerate(optimizer.param_groups) if math.isclose(g["initial_lr"], base)),
        None,
    )
    lr_hook = trainer_cls.build_lr_hook(optimizer, scheduler)
    if group is None:
        group = lr_hook._best_param_group_id

    class _Probe(TrainerBase):
        def run_step(self):
            pass

    probe = _Probe()
    probe.iters_per_epoch = iters_per_epoch
    probe.max_epoch = max_epoch
    probe.max_iter = max_epoch * iters_per_epoch
    recorder = _Recorder(optimizer, group, iteration_mode)
    probe.register_hooks([recorder, lr_hook])
    with warnings.catch_warnings():  # the probe's optimizer never steps, by design
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        probe.train(0, max_epoch, iters_per_epoch)
    return {"unit": "iter" if iteration_mode else "epoch", "lr": recorder.changes}


def _train_set_size(cfg):
    from reidzoo.data.build import build_dataset

    num_images, pids = 0, set()
    for name in cfg.DATASETS.NAMES:
        data = build_dataset(cfg, name)
        num_images += len(data.train)
        pids.update((name, item[1]) for item in data.train)
    return num_images, len(pids)


def _round(lr):
    return float(f"{lr:.10g}")


def main(argv=None):
    """Command line: ``python -m reidzoo.schedule --config-file CFG [...]``."""
    from reidzoo.config import setup_cfg

    parser = argparse.ArgumentParser(
        prog="python -m reidzoo.schedule",
        description="Print the learning rate at every epoch (or iteration) where it changes.",
    )
    parser.add_argument("--config-file", required=True, help="config file or registered name")
    parser.add_argument(
        "--iters-per-epoch",
        type=int,
        default=None,
        help="iterations per epoch (default: from the training set, which must then exist)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        cfg = setup_cfg(args.config_file, args.opts, freeze=False)
        table = schedule_table(cfg, args.iters_per_epoch)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    unit = table["unit"]
    for k, lr in table["lr"].items():
        print(f"{unit} {k}: lr {_round(lr):.6g}")
    print(json.dumps({"unit": unit, "lr": {str(k): _round(v) for k, v in table["lr"].items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
