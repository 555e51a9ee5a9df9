"""The reidzoo trainer: fast-reid's DefaultTrainer made CPU-safe, iteration-aware and strict."""

import logging
import os

import torch
from fastreid.data import build_reid_test_loader, build_reid_train_loader
from fastreid.data.common import CommDataset
from fastreid.engine import DefaultTrainer
from fastreid.engine.train_loop import AMPTrainer, SimpleTrainer, TrainerBase
from fastreid.modeling.meta_arch import build_model
from fastreid.solver import build_lr_scheduler, build_optimizer
from fastreid.utils import comm
from fastreid.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from reidzoo.checkpoint import Checkpointer
from reidzoo.data.build import build_dataset
from reidzoo.data.transforms import build_transforms_with_registry

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
        self._trainer = trainer_cls(model, data_loader, optimizer, param_wrapper)

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
        self.checkpointer = Checkpointer(
            model,
            cfg.OUTPUT_DIR,
            save_to_disk=comm.is_main_process(),
            strict=cfg.REIDZOO.STRICT_LOAD,
            optimizer=optimizer,
            **self.scheduler,
        )
        self.start_epoch = 0
        self.max_iter = self.max_epoch * self.iters_per_epoch
        self.warmup_iters = cfg.SOLVER.WARMUP_ITERS
        self.delay_epochs = cfg.SOLVER.DELAY_EPOCHS
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume=True):
        """Resume from ``OUTPUT_DIR/last_checkpoint`` if ``resume`` and it exists, else load
        ``MODEL.WEIGHTS`` (model only).

        Args:
            resume (bool)
        """
        checkpoint = self.checkpointer.resume_or_load(self.cfg.MODEL.WEIGHTS, resume=resume)
        if resume and self.checkpointer.has_checkpoint():
            self.start_epoch = checkpoint.get("epoch", -1) + 1
            logger.info("Resuming at epoch %d", self.start_epoch)

    def build_hooks(self):
        """fast-reid's hooks, with the progress/ETA lines every ``REIDZOO.LOG_PERIOD``
        iterations instead of every 200."""
        from fastreid.engine import hooks

        ret = super().build_hooks()
        for h in ret:
            if isinstance(h, hooks.PeriodicWriter):
                h._period = self.cfg.REIDZOO.LOG_PERIOD
        return ret

    @classmethod
    def build_model(cls, cfg):
        model = build_model(cfg)
        logger.info("Model:\n%s", model)
        return model

    @classmethod
    def build_optimizer(cls, cfg, model):
        # contiguous=True steps a flat copy on torch 2.x and the model never changes.
        return build_optimizer(cfg, model, contiguous=False)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer, iters_per_epoch):
        return build_lr_scheduler(cfg, optimizer, iters_per_epoch)

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
        transforms = build_transforms_with_registry(cfg, is_train=True)
        train_set = CommDataset(items, transforms, relabel=True)
        return build_reid_train_loader(cfg, train_set=train_set, transforms=transforms)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Query + gallery loader for one test set.

        Returns:
            tuple[DataLoader, int]: the loader and the number of query images.
        """
        data = build_dataset(cfg, dataset_name)
        if comm.is_main_process():
            data.show_test()
        transforms = build_transforms_with_registry(cfg, is_train=False)
        test_set = CommDataset(data.query + data.gallery, transforms, relabel=False)
        return build_reid_test_loader(
            test_set=test_set,
            test_batch_size=cfg.TEST.IMS_PER_BATCH,
            num_query=len(data.query),
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_dir=None):
        """Test loader and the evaluator named by ``TEST.EVALUATOR`` (fast-reid's
        ``ReidEvaluator`` by default, or reidzoo's memory-bounded ``ChunkedReidEvaluator``)."""
        from reidzoo.evaluation import build_reid_evaluator

        data_loader, num_query = cls.build_test_loader(cfg, dataset_name)
        num_gallery = len(data_loader.dataset) - num_query
        return data_loader, build_reid_evaluator(cfg, num_query, num_gallery, output_dir)
