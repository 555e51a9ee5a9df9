"""Train and evaluate one config on several seeded splits and report mean +- std.

``python -m reidzoo.splits --config-file CFG [--splits 0 1 ... 9] [KEY VALUE ...]`` runs
``train_net.py``'s main once per ``DATASETS.SPLIT_INDEX`` (output in ``OUTPUT_DIR/split_<k>``),
then prints one line per metric ``<metric>: <mean> +- <std> (n=<splits>)`` and writes
``OUTPUT_DIR/splits.json``. It works for any registered dataset that declares ``num_splits``
(:func:`reidzoo.data.datasets.dataset_num_splits`); without ``--splits`` it runs all of them
(VIPeR / PRID 450S: the standard 10). A config none of whose datasets has splits is refused:
every run would train the same data.
"""

import argparse
import json
import logging
import os
import sys

from reidzoo.checkpoint import atomic_write
from reidzoo.config import setup_cfg
from reidzoo.data.datasets import dataset_num_splits, summarize_splits

logger = logging.getLogger(__name__)


class NoSplitsError(ValueError):
    """None of a config's datasets has splits (``num_splits``)."""


def config_splits(cfg):
    """The split indices ``DATASETS.SPLIT_INDEX`` can take for a config's datasets.

    Args:
        cfg (CfgNode): root config.
    Returns:
        list[int]: ``0 .. n-1``, n the fewest splits of the datasets in ``DATASETS.NAMES`` and
        ``DATASETS.TESTS`` that have splits.
    Raises:
        NoSplitsError: none of them has splits (the message names each dataset and how a
            dataset declares them).
    """
    names = list(dict.fromkeys(list(cfg.DATASETS.NAMES) + list(cfg.DATASETS.TESTS)))
    counts = {name: dataset_num_splits(cfg, name) for name in names}
    known = [n for n in counts.values() if n]
    if not known:
        raise NoSplitsError(
            f"none of the datasets of DATASETS.NAMES / DATASETS.TESTS ({', '.join(names)}) has "
            "splits, so every split would train and test the same data. A dataset with splits "
            "declares the class attribute num_splits and takes split_index (README, Datasets)."
        )
    return list(range(min(known)))


def run_splits(config_file, opts, splits=None, train=True, overwrite=False, resume=False):
    """Run training + evaluation (or evaluation only) per split.

    Args:
        config_file (str): YAML config.
        opts (list[str]): ``KEY VALUE`` overrides.
        splits (Iterable[int] | None): split indices; None: all of :func:`config_splits`.
        train (bool): train each split (else ``--eval-only``, needs MODEL.WEIGHTS).
        overwrite (bool): ``train_net.py --overwrite`` for each split (move an old run aside).
        resume (bool): ``train_net.py --resume`` for each split.
    Returns:
        tuple[list[dict], dict]: per-split results and :func:`summarize_splits` of them.
    Raises:
        NoSplitsError: no dataset of the config has splits (:func:`config_splits`).
    """
    from reidzoo.engine import default_argument_parser, main

    base = setup_cfg(config_file, opts, freeze=True)
    available = config_splits(base)
    splits = available if splits is None else [int(k) for k in splits]
    per_split = []
    for k in splits:
        out = os.path.join(base.OUTPUT_DIR, f"split_{k}")
        argv = ["--config-file", config_file] + ([] if train else ["--eval-only"])
        argv += (["--overwrite"] if overwrite else []) + (["--resume"] if resume else [])
        argv += list(opts) + ["DATASETS.SPLIT_INDEX", str(k), "OUTPUT_DIR", out]
        args = default_argument_parser().parse_args(argv)
        results = main(args)
        if len(base.DATASETS.TESTS) == 1 and "Rank-1" not in results:
            results = next(iter(results.values()))
        per_split.append({m: float(v) for m, v in results.items() if m != "dataset"})
    summary = summarize_splits(per_split)
    payload = {"splits": list(splits), "per_split": per_split, "summary": summary}
    atomic_write(
        os.path.join(base.OUTPUT_DIR, "splits.json"), lambda f: json.dump(payload, f, indent=2), "w"
    )
    return per_split, summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument(
        "--splits", type=int, nargs="+", default=None, help="default: every split of the data"
    )
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument(
        "--overwrite", action="store_true", help="move a split's earlier run aside first"
    )
    parser.add_argument("--resume", action="store_true", help="resume each split's run")
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        _, summary = run_splits(
            args.config_file,
            args.opts,
            args.splits,
            train=not args.eval_only,
            overwrite=args.overwrite,
            resume=args.resume,
        )
    except NoSplitsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for metric, s in summary.items():
        print(f"{metric}: {s['mean']:.2f} +- {s['std']:.2f} (n={s['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
