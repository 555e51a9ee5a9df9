"""Each paper's explanatory maps over input images: ``python -m reidzoo.visualize maps``.

Usage::

    python -m reidzoo.visualize maps --config-file CFG --input IMG [IMG ...] \\
        [--checkpoint model_final.pth] [--output DIR] [--positions Y,X ...] \\
        [--channels C ...] [--producer NAME ...] [--alpha A] [--scale S] [--cmap NAME] \\
        [--batch B] [KEY VALUE ...]

The model is built from the config (a file or a registered model name;
``reidzoo.config.setup_cfg``, plugins included) with
``reidzoo.modeling.build.build_eval_model``, which loads ``--checkpoint PTH`` or, the same,
``MODEL.WEIGHTS PTH`` (neither: random initialisation, with a warning) exactly as
``train_net.py --eval-only``, ``reidzoo.extract`` and ``reidzoo.export`` do
(:func:`reidzoo.checkpoint.load_for_inference`: weights-only, no ImageNet weights, the
classifier sized from the checkpoint, which PMM's Grad-CAM maps need). Every image goes
through the model's test preprocessing (fast-reid's test transforms plus registered ones:
resize to ``INPUT.SIZE_TEST``, float 0-255), the producers registered in
:data:`reidzoo.visualize.overlay.MAP_REGISTRY` that match the model compute their maps, and
one PNG per image and map kind is written atomically to
``DIR/<image>_<producer>_<kind>.png``: the network input, then each map blended onto it.
"""

import argparse
import logging
import os
import sys
import warnings

import torch

from reidzoo.visualize.common import save_png
from reidzoo.visualize.overlay import compose_tiles, render_kind, select_producers

logger = logging.getLogger("reidzoo.visualize.maps")  # not "__main__" under `python -m`

DEFAULT_OUTPUT = "maps"


def parse_position(text):
    """``"Y,X"`` fractions of the input height and width -> (y, x).

    Args:
        text (str): e.g. ``"0.1,0.5"`` (the top centre).
    Returns:
        tuple[float, float]
    Raises:
        argparse.ArgumentTypeError: not two numbers in [0, 1].
    """
    try:
        y, x = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--positions entry {text!r}: expected Y,X as fractions of the height and width, "
            "e.g. 0.1,0.5"
        ) from None
    if not (0.0 <= y <= 1.0 and 0.0 <= x <= 1.0):
        raise argparse.ArgumentTypeError(f"--positions entry {text!r}: Y and X must be in [0, 1]")
    return y, x


def add_arguments(parser):
    """Add the ``maps`` options to an argument parser.

    Args:
        parser (argparse.ArgumentParser)
    Returns:
        argparse.ArgumentParser: ``parser``.
    """
    parser.add_argument("--config-file", default="", metavar="FILE", help="config YAML")
    parser.add_argument(
        "--input", nargs="+", required=True, metavar="IMG",
        help="image files, folders of images or glob patterns",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint", default="", metavar="PTH",
        help="model weights (default MODEL.WEIGHTS; neither: random initialisation)",
    )  # fmt: skip
    parser.add_argument(
        "--output", default=DEFAULT_OUTPUT, metavar="DIR",
        help=f"folder for the PNG files (default {DEFAULT_OUTPUT})",
    )  # fmt: skip
    parser.add_argument(
        "--positions", nargs="+", type=parse_position, default=None, metavar="Y,X",
        help="IANet: positions whose SIA receptive field is shown, as fractions of the input "
        "height and width (default: head, torso, belt, legs, shoes on the centre line)",
    )  # fmt: skip
    parser.add_argument(
        "--channels", nargs="+", type=int, default=None, metavar="C",
        help="IANet: 0-based CIA output channels to show (default 4 24 120, Fig. 8)",
    )  # fmt: skip
    parser.add_argument(
        "--producer", nargs="+", default=None, metavar="NAME",
        help="registered map producers to run (default: every one that matches the model)",
    )  # fmt: skip
    parser.add_argument("--alpha", type=float, default=0.5, help="map opacity (default 0.5)")
    parser.add_argument(
        "--batch", type=int, default=16, help="images per forward pass (default 16)"
    )
    parser.add_argument(
        "--scale", type=int, default=1, help="integer display enlargement (default 1)"
    )
    parser.add_argument("--cmap", default="jet", help="matplotlib colormap (default jet)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def add_parser(subparsers):
    """Add the ``maps`` sub-command to a ``python -m reidzoo.visualize`` parser.

    Args:
        subparsers: the object returned by ``ArgumentParser.add_subparsers()``.
    Returns:
        argparse.ArgumentParser: the sub-command's parser; its ``func`` default is
        :func:`run` (``args.func(args)`` returns the exit status).
    """
    p = subparsers.add_parser(
        "maps",
        help="each paper's explanatory maps overlaid on input images",
        description="Write each paper's explanatory maps (attention, receptive fields, "
        "masks, Grad-CAM) overlaid on the input images, one PNG per image and map kind.",
    )
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def _parser():
    return add_arguments(
        argparse.ArgumentParser(
            prog="python -m reidzoo.visualize maps",
            description="Write each paper's explanatory maps overlaid on the input images.",
        )
    )


def expand_inputs(paths):
    """Image files named by files, folders (their images, sorted) or glob patterns.

    Args:
        paths (Iterable[str])
    Returns:
        list[str]
    Raises:
        FileNotFoundError: a path does not exist, or a folder or pattern holds no image.
    """
    from reidzoo.inference import expand_path

    return [f for path in paths for f in expand_path(path)]


def load_images(paths, cfg):
    """Read images as the test data loader does and apply the model's test preprocessing
    (fast-reid's test transforms with ``INPUT.TRANSFORMS`` spliced in).

    Args:
        paths (Sequence[str]): image files.
        cfg (CfgNode): uses ``INPUT.SIZE_TEST``, ``INPUT.CROP`` and ``INPUT.TRANSFORMS``.
    Returns:
        Tensor: [N, 3, H, W] float 0-255, the network inputs.
    Raises:
        OSError: a file is not a readable image (the message names it).
    """
    from reidzoo.data.transforms import build_transforms_with_registry
    from reidzoo.inference import to_pil

    transform = build_transforms_with_registry(cfg, is_train=False)
    batch = []
    for path in paths:
        image = to_pil(path, path)
        with warnings.catch_warnings():  # fast-reid's ToTensor uses torch.ByteStorage
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            batch.append(transform(image).float())
    shapes = {tuple(t.shape) for t in batch}
    if len(shapes) != 1:
        raise ValueError(f"the test transforms gave images of different sizes: {sorted(shapes)}")
    return torch.stack(batch)


def output_names(paths):
    """File-name stems for the inputs, unique even when two folders hold the same name.

    Args:
        paths (Sequence[str])
    Returns:
        list[str]
    """
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{i:03d}_{s}" for i, s in enumerate(stems)]


def produce_maps(model, cfg, images, producers=None, options=None):
    """Run the map producers that explain ``model`` on a batch.

    Args:
        model (nn.Module): eval model.
        cfg (CfgNode)
        images (Tensor): [N, 3, H, W] float 0-255 network inputs.
        producers (Sequence[str] | None): registered names; None: every matching one.
        options (dict | None): producer options (``positions``, ``channels``).
    Returns:
        list[tuple[str, list[dict]]]: (producer TAG, per image kind -> list of MapPanel).
    """
    device = next(iter(model.buffers()), torch.empty(0)).device
    images = images.to(device)
    out = []
    for cls in select_producers(model, cfg, producers):
        tag = cls.TAG or cls.__name__.lower()
        out.append((tag, cls(model, cfg, options)(images)))
    return out


def write_maps(images, names, results, output, alpha=0.5, cmap="jet", scale=1):
    """Render and write one PNG per image, producer and map kind.

    Args:
        images (Tensor): [N, 3, H, W] float 0-255 network inputs.
        names (Sequence[str]): N file-name stems.
        results (list): from :func:`produce_maps`.
        output (str): folder (created).
        alpha, cmap, scale: see :func:`reidzoo.visualize.overlay.render_panel`.
    Returns:
        list[str]: written files, in order.
    """
    written = []
    os.makedirs(output, exist_ok=True)
    for tag, per_image in results:
        for image, name, kinds in zip(images.cpu(), names, per_image):
            for kind, panels in kinds.items():
                tiles = render_kind(image, panels, alpha, cmap, scale)
                path = os.path.join(output, f"{name}_{tag}_{kind}.png")
                save_png(compose_tiles(tiles), path)
                written.append(path)
    return written


def run(args):
    """Run the ``maps`` command from parsed arguments.

    Args:
        args (argparse.Namespace): from :func:`add_arguments`.
    Returns:
        int: 0 on success (the written files are printed, one per line).
    """
    from reidzoo.config import setup_cfg
    from reidzoo.modeling.build import build_eval_model

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from reidzoo.inference import checkpoint_opts

    if args.checkpoint and not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint not found: '{args.checkpoint}'")
    cfg = setup_cfg(args.config_file, checkpoint_opts(args.checkpoint, args.opts), freeze=False)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE %s: no CUDA device here, using the CPU", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}")
    paths = expand_inputs(args.input)
    names = output_names(paths)
    model = build_eval_model(cfg)
    options = {"positions": args.positions, "channels": args.channels}
    written, tags = [], set()
    for start in range(0, len(paths), args.batch):
        chunk = slice(start, start + args.batch)
        images = load_images(paths[chunk], cfg)
        results = produce_maps(model, cfg, images, args.producer, options)
        tags.update(t for t, _ in results)
        written += write_maps(
            images, names[chunk], results, args.output, args.alpha, args.cmap, args.scale
        )
    if not written:
        logger.warning("the producers %s made no map for this model", sorted(tags))
    for path in written:
        print(path, flush=True)
    return 0


def main(argv=None):
    """Command-line entry point (also usable directly).

    Args:
        argv (list[str] | None): arguments without the program name; None reads ``sys.argv``.
    Returns:
        int: exit status.
    """
    return run(_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
