"""The reidzoo trainer: fast-reid's DefaultTrainer made CPU-safe, iteration-aware and strict."""

import logging
import os

import torch
from fastreid.data import build_reid_test_loader
from fastreid.engine import DefaultTrainer
from fastreid.engine.train_loop import AMPTrainer, SimpleTrainer, TrainerBase
from fastreid.solver import build_optimizer
from fastreid.utils import comm
from fastreid.utils.events import CommonMetricPrinter, get_event_storage
from fastreid.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from reidzoo import schedule
from reidzoo.checkpoint import Checkpointer
from reidzoo.data.build import ReidDataset, build_dataset
from reidzoo.data.stream import DeferredLoader, build_stream_train_loader, run_seed, stream_of
from reidzoo.data.transforms import build_transforms_with_registry
from reidzoo.engine.hooks import BufferSync, EpochSeed, FinalCheckpoint, PeriodicCheckpointer
from reidzoo.engine.run_folder import (
    protect_run_folder,
    remove_stale_temporaries,
    truncate_metrics,
)
from reidzoo.modeling.build import build_model

logger = logging.getLogger(__name__)


def prepare_cfg(cfg):
    """Adjust a config for the machine it runs on; returns a (frozen if given frozen) copy.

    AMP asserts CUDA in fast-reid's AMPTrainer: on a CPU device it is turned off with a warning
    (``REIDZOO.CPU_DISABLE_AMP``).

    Args:
        cfg (CfgNode)
    Returns:
        CfgNode
    """
    frozen = cfg.is_frozen()
    cfg = cfg.clone()
    cfg.defrost()
    on_cpu = torch.device(cfg.MODEL.DEVICE).type == "cpu"
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"MODEL.DEVICE is '{cfg.MODEL.DEVICE}' but CUDA is not available; "
            "pass `MODEL.DEVICE cpu` to train on the CPU"
        )
    if on_cpu and cfg.SOLVER.AMP.ENABLED and cfg.REIDZOO.CPU_DISABLE_AMP:
        logger.warning("SOLVER.AMP.ENABLED is True but MODEL.DEVICE is cpu: AMP turned off")
        cfg.SOLVER.AMP.ENABLED = False
    if frozen:
        cfg.freeze()
    return cfg


class MetricPrinter(CommonMetricPrinter):
    """fast-reid's progress/ETA printer that skips a second write at the same iteration.

    fast-reid's estimates the ETA from its previous write while the iteration timer warms up
    (fewer than 3 iterations), so a second write at the same iteration (end of step, then end
    of epoch) divides by zero; a repeated write has nothing new to print.
    """

    def write(self):
        last = getattr(self, "_last_write", None)
        if last is not None and last[0] == get_event_storage().iter:
            return
        super().write()


class ReidTrainer(DefaultTrainer):
    """fast-reid's ``DefaultTrainer`` with the fixes and extensions reidzoo needs.

    * CPU training: no CUDA streams, AMP off on CPU, DDP without ``device_ids`` on CPU (gloo).
    * The optimizer steps the model's own parameters (``contiguous=False``).
    * Datasets are built under ``DATASETS.ROOT``, with registered transforms spliced in and
      ``DATALOADER.NUM_WORKERS`` honoured by the test loader too.
    * Iteration-based schedules: with ``SOLVER.MAX_ITER > 0`` an "epoch" is one iteration, so
      ``SOLVER.STEPS``, ``SOLVER.CHECKPOINT_PERIOD`` and ``TEST.EVAL_PERIOD`` count iterations.
    * Checkpoints are written atomically; ``MODEL.WEIGHTS`` must match the model when
      ``REIDZOO.STRICT_LOAD`` is True.

    Subclass it and override ``build_model``/``build_train_loader``/... as with fast-reid.
    """

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("fastreid").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = prepare_cfg(cfg)
        if comm.is_main_process() and cfg.OUTPUT_DIR:
            os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
            remove_stale_temporaries(cfg.OUTPUT_DIR)
        data_loader = self.build_train_loader(cfg)
        num_images = len(data_loader.dataset)
        cfg = self.auto_scale_hyperparams(cfg, data_loader.dataset.num_classes)
        model = self.build_model(cfg)
        optimizer, param_wrapper = self.build_optimizer(cfg, model)
        if comm.get_world_size() > 1:
            on_cuda = next(model.parameters()).device.type == "cuda"
            model = DistributedDataParallel(
                model,
                device_ids=[comm.get_local_rank()] if on_cuda else None,
                broadcast_buffers=False,
                find_unused_parameters=cfg.REIDZOO.FIND_UNUSED_PARAMETERS,
            )
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        # The loader's iterator is created at the first step, once resume has positioned it.
        self._trainer = trainer_cls(model, DeferredLoader(data_loader), optimizer, param_wrapper)
        self._trainer.data_loader = data_loader
        self._stream, self._stream_set = stream_of(data_loader)
        self.seed = self._stream.seed if self._stream is not None else run_seed(cfg)
        self.best_metric = -1
        self.finished_checkpoint = None

        if cfg.SOLVER.MAX_ITER > 0:
            self.iters_per_epoch = 1
            self.max_epoch = cfg.SOLVER.MAX_ITER
        else:
            self.iters_per_epoch = num_images // cfg.SOLVER.IMS_PER_BATCH
            if self.iters_per_epoch == 0:
                raise ValueError(
                    f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} is larger than the "
                    f"training set ({num_images} images): no full batch per epoch"
                )
            self.max_epoch = cfg.SOLVER.MAX_EPOCH
        self.scheduler = self.build_lr_scheduler(cfg, optimizer, self.iters_per_epoch)
        checkpointables = dict(optimizer=optimizer, **self.scheduler)
        if cfg.SOLVER.AMP.ENABLED:
            checkpointables["grad_scaler"] = self._trainer.grad_scaler
        self.checkpointer = Checkpointer(
            model,
            cfg.OUTPUT_DIR,
            save_to_disk=comm.is_main_process(),
            strict=cfg.REIDZOO.STRICT_LOAD,
            trusted=not cfg.REIDZOO.WEIGHTS_ONLY,  # --resume and MODEL.WEIGHTS
            **checkpointables,
        )
        self.start_epoch = 0
        self.max_iter = self.max_epoch * self.iters_per_epoch
        self.warmup_iters = cfg.SOLVER.WARMUP_ITERS
        self.delay_epochs = cfg.SOLVER.DELAY_EPOCHS
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume=True):
        """Resume from ``OUTPUT_DIR/last_checkpoint`` if ``resume`` and it exists, else load
        ``MODEL.WEIGHTS`` (model only) into a new run.

        A resumed run continues exactly where the checkpoint was written: the data stream moves
        to the next sample, the run's seed is the checkpoint's, and ``metrics.json`` loses the
        lines written after the checkpoint (they are written again). A new run refuses an
        ``OUTPUT_DIR`` that already holds another run.

        Args:
            resume (bool)
        Raises:
            RunFolderError: a new run (``resume=False``) into a folder that holds a run.
        """
        if not resume and comm.is_main_process():
            protect_run_folder(self.cfg.OUTPUT_DIR)
        resuming = resume and self.checkpointer.has_checkpoint()
        checkpoint = self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if resuming:
            self.start_epoch = checkpoint.get("epoch", -1) + 1
            self.best_metric = checkpoint.get("best_metric", -1)
            seed = checkpoint.get("seed")
            source = self.checkpointer.get_checkpoint_file()
            if seed is None or self._stream is None:
                logger.warning(
                    "%s holds no data-stream seed (or the training loader is not reidzoo's "
                    "stream): the resumed run will not repeat the uninterrupted one exactly",
                    source,
                )
            else:
                self.seed = int(seed)
            if self.start_epoch >= self.max_epoch:
                self.finished_checkpoint = source
            logger.info("Resuming at epoch %d from %s", self.start_epoch, source)
            if comm.is_main_process() and truncate_metrics(
                self.cfg.OUTPUT_DIR, self.start_epoch * self.iters_per_epoch
            ):
                self._reopen_json_writers()
        if self._stream is not None:
            self._stream.seed = self._stream_set.seed = self.seed
            mini_batch = self.cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
            self._stream.set_start(self.start_epoch * self.iters_per_epoch * mini_batch)

    def _reopen_json_writers(self):
        from fastreid.engine import hooks as fr_hooks
        from fastreid.utils.events import JSONWriter

        for h in self._hooks:
            for w in getattr(h, "_writers", ()) if isinstance(h, fr_hooks.PeriodicWriter) else ():
                if isinstance(w, JSONWriter):
                    name = w._file_handle.name
                    w._file_handle.close()
                    w._file_handle = open(name, "a")

    def checkpoint_state(self):
        """What a checkpoint holds besides the model, optimizer and schedulers, for an exact
        resume: the data-stream seed and the best metric so far.

        Returns:
            dict
        """
        return {"seed": self.seed, "best_metric": float(self.best_metric)}

    def train(self):
        """Train from ``start_epoch`` to the last epoch; returns the last evaluation's results
        (main process), or None when a resumed run was already finished."""
        if self.finished_checkpoint is not None:
            logger.warning(
                "Nothing to resume: the run in %s is finished (%s: %d of %d epochs, or "
                "iterations in MAX_ITER mode, trained). Evaluate it with --eval-only "
                "MODEL.WEIGHTS %s, or raise SOLVER.MAX_EPOCH/MAX_ITER to train on.",
                os.path.abspath(self.cfg.OUTPUT_DIR),
                self.finished_checkpoint,
                self.start_epoch,
                self.max_epoch,
                self.finished_checkpoint,
            )
            return None
        return super().train()

    def build_hooks(self):
        """fast-reid's hooks, reordered and extended:

        * the learning-rate hook steps reidzoo's absolute schedule (:mod:`reidzoo.schedule`);
        * every epoch starts from a seed of its own (exact resume on every rank);
        * with several processes, every rank's buffers are made equal before evaluation and
          checkpointing, so the evaluation sees the model that is saved;
        * ``model_final`` is written before the final evaluation;
        * progress/ETA lines every ``REIDZOO.LOG_PERIOD`` iterations instead of every 200;
        * with ``REIDZOO.DIAGNOSTICS.ENABLED``, the training diagnostics
          (:class:`reidzoo.engine.diagnostics.TrainingDiagnostics`).
        """
        from fastreid.engine import hooks as fr_hooks

        ret = []
        for h in super().build_hooks():
            if isinstance(h, fr_hooks.LRScheduler):
                ret += [EpochSeed(), self.build_lr_hook(self.optimizer, self.scheduler)]
                continue
            if isinstance(h, fr_hooks.EvalHook):
                if comm.get_world_size() > 1:
                    ret.append(BufferSync())
                if comm.is_main_process():
                    ret.append(FinalCheckpoint(self.checkpointer))
            if isinstance(h, fr_hooks.PeriodicCheckpointer):
                h = PeriodicCheckpointer(
                    self.checkpointer,
                    self.cfg.SOLVER.CHECKPOINT_PERIOD,
                    self.cfg.REIDZOO.CHECKPOINT_KEEP,
                )
            if isinstance(h, fr_hooks.PeriodicWriter):
                h._period = self.cfg.REIDZOO.LOG_PERIOD
            ret.append(h)
        if self.cfg.REIDZOO.DIAGNOSTICS.ENABLED:  # README "Training diagnostics"
            from reidzoo.engine.diagnostics import TrainingDiagnostics

            ret.append(TrainingDiagnostics(self.cfg.REIDZOO.DIAGNOSTICS.PERIOD))
        return ret

    def build_writers(self):
        """fast-reid's writers, with :class:`MetricPrinter` for its ``CommonMetricPrinter``."""
        return [
            MetricPrinter(self.max_iter) if type(w) is CommonMetricPrinter else w
            for w in super().build_writers()
        ]

    @classmethod
    def build_lr_hook(cls, optimizer, scheduler):
        """The hook that steps the schedulers of :meth:`build_lr_scheduler`."""
        return schedule.LRSchedulerHook(optimizer, scheduler)

    @classmethod
    def build_model(cls, cfg):
        # reidzoo's build path: plugin look-up of missing names, no download, out-of-place
        # normalisation for fast-reid's Baseline/MGN (reidzoo.modeling.build.build_model).
        model = build_model(cfg)
        logger.info("Model:\n%s", model)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        # contiguous=True steps a flat copy on torch 2.x and the model never changes.
        return build_optimizer(cfg, model, contiguous=False)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer, iters_per_epoch):
        """reidzoo's absolute schedule (:func:`reidzoo.schedule.build_lr_scheduler`):
        ``SOLVER.STEPS`` count from the start of training, warmup included."""
        return schedule.build_lr_scheduler(cfg, optimizer, iters_per_epoch)

    @classmethod
    def build_train_loader(cls, cfg):
        """Training loader over ``DATASETS.NAMES`` with fast-reid's sampler and transforms
        plus the registered ones.

        Returns:
            torch.utils.data.DataLoader
        """
        items = []
        for name in cfg.DATASETS.NAMES:
            data = build_dataset(cfg, name)
            if comm.is_main_process():
                data.show_train()
            items.extend(data.train)
        if not items:
            raise ValueError(f"no training images in DATASETS.NAMES={tuple(cfg.DATASETS.NAMES)}")
        from reidzoo.data.build import check_datasets, check_identity_sampler

        # Before any step: every train/query/gallery image decodes (one error naming all that
        # do not), and the sampler can fill a batch (fast-reid's would loop forever).
        check_identity_sampler(cfg, items)
        check_datasets(cfg, items)
        transforms = build_transforms_with_registry(cfg, is_train=True)
        train_set = ReidDataset(items, transforms, relabel=True)
        return build_stream_train_loader(cfg, train_set, transforms)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Query + gallery loader for one test set.

        Returns:
            tuple[DataLoader, int]: the loader and the number of query images.
        """
        data = build_dataset(cfg, dataset_name)
        if comm.is_main_process():
            data.show_test()
        from reidzoo.data.build import check_dataset_images

        check_dataset_images(  # cached when the trainer checked it already
            cfg,
            {
                f"{dataset_name} query": [item[0] for item in data.query],
                f"{dataset_name} gallery": [item[0] for item in data.gallery],
            },
        )
        transforms = build_transforms_with_registry(cfg, is_train=False)
        test_set = ReidDataset(data.query + data.gallery, transforms, relabel=False)
        return build_reid_test_loader(
            test_set=test_set,
            test_batch_size=cfg.TEST.IMS_PER_BATCH,
            num_query=len(data.query),
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_dir=None):
        """Test loader and the evaluator named by ``TEST.EVALUATOR`` (fast-reid's
        ``ReidEvaluator`` by default, or reidzoo's memory-bounded ``ChunkedReidEvaluator``).

        A meta-architecture class with a ``build_evaluator(cfg, make_evaluator)`` classmethod
        builds the evaluator itself from ``make_evaluator()`` (a new ``TEST.EVALUATOR``
        evaluator per call), e.g. to rank parts of its feature too (PFE stage II)."""
        from reidzoo.evaluation import build_reid_evaluator
        from reidzoo.registry import META_ARCH_REGISTRY

        data_loader, num_query = cls.build_test_loader(cfg, dataset_name)
        num_gallery = len(data_loader.dataset) - num_query

        def make_evaluator():
            return build_reid_evaluator(cfg, num_query, num_gallery, output_dir)

        arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
        build = getattr(arch, "build_evaluator", None)
        return data_loader, build(cfg, make_evaluator) if build is not None else make_evaluator()
