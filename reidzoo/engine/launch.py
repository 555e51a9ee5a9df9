"""What ``train_net.py`` runs: argument parsing, setup, train or evaluate, multi-process."""

import json
import logging
import os

from fastreid.engine import default_argument_parser as _fastreid_parser
from fastreid.engine import launch as _fastreid_launch
from fastreid.utils import comm
from fastreid.utils.env import seed_all_rng

from reidzoo.checkpoint import atomic_write, load_for_inference
from reidzoo.config import setup_cfg
from reidzoo.engine.run_folder import protect_run_folder

logger = logging.getLogger(__name__)


def default_argument_parser():
    """fast-reid's command line: ``--config-file``, ``--resume``, ``--eval-only``,
    ``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url`` and trailing
    ``KEY VALUE`` overrides, plus ``--overwrite``. On a CPU, ``--num-gpus N`` means N processes
    (gloo).

    Returns:
        argparse.ArgumentParser
    """
    parser = _fastreid_parser()
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run in an OUTPUT_DIR that holds another run, after moving that run "
        "to OUTPUT_DIR.replaced-<time> (nothing is deleted)",
    )
    return parser


def setup(args):
    """Config from the command line, logging, output folder and seeds.

    Args:
        args (argparse.Namespace): from :func:`default_argument_parser`.
    Returns:
        CfgNode: frozen config.
    """
    from reidzoo.engine.trainer import prepare_cfg

    cfg = prepare_cfg(setup_cfg(args.config_file, args.opts, freeze=False))
    cfg.freeze()
    if not getattr(args, "eval_only", False):
        # Before anything is written into OUTPUT_DIR (config.yaml, log.txt).
        if comm.is_main_process():
            protect_run_folder(
                cfg.OUTPUT_DIR,
                resume=getattr(args, "resume", False),
                overwrite=getattr(args, "overwrite", False),
            )
        comm.synchronize()
    _default_setup(cfg, args)
    if cfg.REIDZOO.SEED >= 0:
        seed_all_rng(cfg.REIDZOO.SEED + comm.get_rank())
    return cfg


def _default_setup(cfg, args):
    """fast-reid's ``default_setup`` (logger, environment and config in the log, config copy,
    cuDNN benchmark), except that ``--eval-only`` writes its config to ``config_eval.yaml``
    instead of replacing the training run's ``config.yaml``."""
    import torch
    from fastreid.utils.collect_env import collect_env_info
    from fastreid.utils.logger import setup_logger

    output_dir = cfg.OUTPUT_DIR
    eval_only = getattr(args, "eval_only", False)
    if comm.is_main_process() and output_dir:
        os.makedirs(output_dir, exist_ok=True)
    log = setup_logger(output_dir, distributed_rank=comm.get_rank())
    log.info("Rank of current process: %d. World size: %d", comm.get_rank(), comm.get_world_size())
    log.info("Environment info:\n%s", collect_env_info())
    log.info("Command line arguments: %s", args)
    if getattr(args, "config_file", "") and os.path.isfile(args.config_file):
        with open(args.config_file) as f:
            log.info("Contents of args.config_file=%s:\n%s", args.config_file, f.read())
    log.info("Running with full config:\n%s", cfg)
    if comm.is_main_process() and output_dir:
        path = os.path.join(output_dir, "config_eval.yaml" if eval_only else "config.yaml")
        atomic_write(path, lambda f: f.write(cfg.dump()), mode="w")
        log.info("Full config saved to %s", os.path.abspath(path))
    seed_all_rng()
    if not eval_only:
        torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK


def main(args, trainer_cls=None):
    """Train (optionally resuming) or evaluate, as ``tools/train_net.py`` does in fast-reid.

    Args:
        args (argparse.Namespace)
        trainer_cls (type | None): trainer class; default :class:`ReidTrainer`.
    Returns:
        dict: evaluation results (on the main process).
    """
    from reidzoo.engine.trainer import ReidTrainer

    trainer_cls = trainer_cls or ReidTrainer
    cfg = setup(args)
    if args.eval_only:
        if not cfg.MODEL.WEIGHTS:
            raise ValueError("--eval-only needs MODEL.WEIGHTS (a checkpoint to evaluate)")
        # The inference rule of every tool: weights-only read, no ImageNet weights, the
        # classifier sized from the checkpoint, any other misfit an error.
        model, cfg = load_for_inference(cfg, trainer_cls.build_model)
        results = trainer_cls.test(cfg, model)
        write_results(cfg, results, "results_eval.json")
        return results
    trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    results = trainer.train()
    write_results(cfg, results, "results.json")
    return results


def write_results(cfg, results, name):
    """Write evaluation results to ``OUTPUT_DIR/name`` (main process, atomic).

    Args:
        cfg (CfgNode)
        results (dict): metric -> value (or dataset -> metric -> value).
        name (str): file name.
    """
    if not (comm.is_main_process() and cfg.OUTPUT_DIR and results):
        return
    payload = {
        "weights": cfg.MODEL.WEIGHTS,
        "datasets": list(cfg.DATASETS.TESTS),
        "results": _plain(results),
    }
    path = os.path.join(cfg.OUTPUT_DIR, name)
    atomic_write(path, lambda f: json.dump(payload, f, indent=2), mode="w")
    logger.info("Evaluation results written to %s", path)


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    try:
        return float(obj)
    except (TypeError, ValueError):
        return str(obj)


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None, args=()):
    """fast-reid's ``launch`` (its worker is made CPU-capable by :mod:`reidzoo.compat`)."""
    return _fastreid_launch(
        main_func,
        num_gpus_per_machine,
        num_machines=num_machines,
        machine_rank=machine_rank,
        dist_url=dist_url,
        args=args,
    )
