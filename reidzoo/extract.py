"""Extract re-ID features of images with a trained model and save them to ``.npz``.

Usage::

    python -m reidzoo.extract --config-file CFG_OR_NAME --input DIR_OR_GLOB [--input ...] \\
        --output feats.npz [--checkpoint PTH] [--batch-size N] [--device cpu] \\
        [--flip | --no-flip] [--no-normalize] [KEY VALUE ...]
    python -m reidzoo.extract --list-models

``--config-file`` takes a YAML file or a registered model name (``--list-models`` prints them).
The weights are ``--checkpoint PTH`` or, the same, ``MODEL.WEIGHTS PTH`` (as in
``reidzoo.export`` and ``reidzoo.visualize``), loaded by
:func:`reidzoo.checkpoint.load_for_inference`: weights-only, without ImageNet weights, the
classifier sized from the checkpoint. The ``.npz`` holds ``features``
(float32 [N, D], L2-normalised rows unless ``--no-normalize``), ``names`` (the N file paths, in
order), and ``config`` (the full config as YAML), ``config_file``, ``checkpoint``,
``normalized`` and ``flip``. It is written through a temporary file and ``os.replace``: a failed
run never leaves a partial file and leaves an existing one untouched. Errors a user can fix (a
missing or unreadable image, a checkpoint that does not fit the config or that needs Python
objects outside the weights-only allow-list, an unknown model name) are printed as one
``error:`` line with exit status 1.
"""

import argparse
import logging
import sys

import numpy as np

logger = logging.getLogger("reidzoo.extract")  # not "__main__" under `python -m`

#: Keys of the ``.npz`` written by :func:`save_features`.
NPZ_KEYS = ("features", "names", "config", "config_file", "checkpoint", "normalized", "flip")


def save_features(path, features, names, config="", config_file="", checkpoint="", **flags):
    """Write features and their names to an ``.npz`` file atomically.

    Args:
        path (str): output file (written as given, no suffix is added).
        features (np.ndarray | Tensor): [N, D].
        names (Sequence[str]): N names.
        config (str): the config as YAML (``cfg.dump()``).
        config_file (str): the config file or model name it came from.
        checkpoint (str): the weights file.
        **flags (bool): stored as boolean scalars (``normalized``, ``flip``).
    Raises:
        ValueError: ``features`` is not 2-D or its rows do not match ``names``.
    """
    from reidzoo.checkpoint import atomic_write

    feats = np.asarray(features, dtype=np.float32)
    names = [str(n) for n in names]
    if feats.ndim != 2 or feats.shape[0] != len(names):
        raise ValueError(
            f"features {tuple(feats.shape)} must be [N, D] with N = {len(names)} names"
        )
    arrays = {
        "features": feats,
        "names": np.array(names, dtype=np.str_).reshape(len(names)),
        "config": np.array(config, dtype=np.str_),
        "config_file": np.array(config_file, dtype=np.str_),
        "checkpoint": np.array(checkpoint, dtype=np.str_),
    }
    arrays.update({k: np.array(bool(v)) for k, v in flags.items()})
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_features(path):
    """Read a file written by :func:`save_features` (no pickled objects are loaded).

    Args:
        path (str)
    Returns:
        dict: ``features`` (np.ndarray [N, D] float32), ``names`` (list[str]) and the other
        keys stored (``config``, ``config_file``, ``checkpoint`` as str; flags as bool).
    Raises:
        FileNotFoundError: no such file.
        KeyError: the file has no ``features`` or ``names`` array.
    """
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("features", "names") if k not in data.files]
        if missing:
            raise KeyError(f"'{path}' has no {' / '.join(missing)} array (keys: {data.files})")
        out = {k: data[k] for k in data.files}
    out["names"] = [str(n) for n in out["names"]]
    for key, value in list(out.items()):
        if key not in ("features", "names") and value.ndim == 0:
            out[key] = value.item()
    return out


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m reidzoo.extract",
        description="Extract L2-normalised re-ID features of images into an .npz file.",
    )
    p.add_argument(
        "--config-file", default="", metavar="FILE|NAME", help="config YAML or model name"
    )
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="PATH",
        help="an image file, folder or glob pattern (quote it); repeat for more",
    )
    p.add_argument("--output", default="", metavar="OUT.npz", help=".npz file to write")
    p.add_argument("--checkpoint", default=None, metavar="PTH", help="weights (MODEL.WEIGHTS)")
    p.add_argument("--batch-size", type=int, default=None, help="default TEST.IMS_PER_BATCH")
    p.add_argument("--device", default=None, help="default MODEL.DEVICE (CPU without CUDA)")
    p.add_argument("--num-workers", type=int, default=None, help="default DATALOADER.NUM_WORKERS")
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average with mirrored images (default TEST.FLIP.ENABLED)",
    )
    p.add_argument(
        "--no-normalize", action="store_true", help="store the raw features, not L2-normalised"
    )
    p.add_argument("--list-models", action="store_true", help="print registered model names")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p


def main(argv=None):
    """Command-line entry point.

    Args:
        argv (list[str] | None): arguments without the program name; None reads ``sys.argv``.
    Returns:
        int: 0 on success, 1 on an error a user can fix (printed as ``error: ...``).
    """
    from reidzoo.checkpoint import CheckpointMismatchError, UnsafeCheckpointError
    from reidzoo.inference import FeatureExtractor, checkpoint_opts, registered_models

    parser = _parser()
    args = parser.parse_args(argv)
    if args.list_models:
        for name, path in registered_models().items():
            print(f"{name}\t{path}")
        return 0
    if not (args.config_file and args.input and args.output):
        parser.error("--config-file, --input and --output are required")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        extractor = FeatureExtractor(
            args.config_file,
            opts=checkpoint_opts(args.checkpoint, args.opts),
            device=args.device,
            batch_size=args.batch_size,
            flip=args.flip,
            normalize=not args.no_normalize,
            num_workers=args.num_workers,
        )
        result = extractor.extract(args.input)
    except (OSError, ValueError, KeyError, CheckpointMismatchError, UnsafeCheckpointError) as e:
        # KeyError's str() is the repr of its message; show the message itself
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 1
    save_features(
        args.output,
        result.features,
        result.names,
        config=extractor.cfg.dump(),
        config_file=args.config_file,
        checkpoint=extractor.checkpoint,
        normalized=extractor.normalize,
        flip=extractor.flip,
    )
    logger.info("wrote %d x %d features to %s", *result.features.shape, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
