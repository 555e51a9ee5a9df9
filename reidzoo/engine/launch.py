"""What ``train_net.py`` runs: argument parsing, setup, train or evaluate, multi-process."""

import json
import logging
import os

from fastreid.engine import default_argument_parser as _fastreid_parser
from fastreid.engine import default_setup
from fastreid.engine import launch as _fastreid_launch
from fastreid.utils import comm
from fastreid.utils.env import seed_all_rng

from reidzoo.checkpoint import atomic_write, load_weights
from reidzoo.config import setup_cfg

logger = logging.getLogger(__name__)


def default_argument_parser():
    """fast-reid's command line: ``--config-file``, ``--resume``, ``--eval-only``,
    ``--num-gpus``, ``--num-machines``, ``--machine-rank``, ``--dist-url`` and trailing
    ``KEY VALUE`` overrides. On a CPU, ``--num-gpus N`` means N processes (gloo).

    Returns:
        argparse.ArgumentParser
    """
    return _fastreid_parser()


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
    default_setup(cfg, args)
    if cfg.REIDZOO.SEED >= 0:
        seed_all_rng(cfg.REIDZOO.SEED + comm.get_rank())
    return cfg


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
        cfg.defrost()
        cfg.MODEL.BACKBONE.PRETRAIN = False
        model = trainer_cls.build_model(cfg)
        if not cfg.MODEL.WEIGHTS:
            raise ValueError("--eval-only needs MODEL.WEIGHTS (a checkpoint to evaluate)")
        load_weights(model, cfg.MODEL.WEIGHTS, strict=cfg.REIDZOO.STRICT_LOAD)
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
