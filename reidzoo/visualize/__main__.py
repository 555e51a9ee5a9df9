"""``python -m reidzoo.visualize {ranks,maps} ...``: the visualisation sub-commands.

``ranks`` (:mod:`reidzoo.visualize.ranks`) draws retrieval rank lists and the CMC curve;
``maps`` (:mod:`reidzoo.visualize.maps`) draws explanatory maps over input images. ``maps`` is
imported only to build its parser; when it cannot be imported, ``ranks`` still works and
``maps`` reports why it is unavailable.
"""

import argparse
import logging
import sys

logger = logging.getLogger("reidzoo.visualize")  # not "__main__" under `python -m`


def _add_maps_parser(subparsers):
    """Add ``maps`` from :mod:`reidzoo.visualize.maps`, or a stand-in that reports why it
    cannot be used (module missing or failing to import)."""
    try:
        from reidzoo.visualize import maps
    except ImportError as e:
        reason = (
            "reidzoo.visualize.maps is not installed"
            if getattr(e, "name", None) == "reidzoo.visualize.maps"
            else f"reidzoo.visualize.maps failed to import: {e}"
        )
        # "+" as the only prefix: every argument, "--input" included, lands in `rest`
        p = subparsers.add_parser(
            "maps", help="explanatory maps (unavailable)", add_help=False, prefix_chars="+"
        )
        p.add_argument("rest", nargs="*")

        def unavailable(_args):
            print(f"error: the maps sub-command is unavailable: {reason}", file=sys.stderr)
            return 1

        p.set_defaults(func=unavailable)
        return
    maps.add_parser(subparsers)


def build_parser():
    """The ``python -m reidzoo.visualize`` parser with its sub-commands.

    Returns:
        argparse.ArgumentParser
    """
    from reidzoo.visualize import ranks

    parser = argparse.ArgumentParser(
        prog="python -m reidzoo.visualize",
        description="Visualise a trained re-ID model: rank lists and CMC (ranks), maps (maps).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="{ranks,maps}")
    subparsers.required = True
    ranks.add_parser(subparsers)
    _add_maps_parser(subparsers)
    return parser


def main(argv=None):
    """Command-line entry point.

    Args:
        argv (list[str] | None): arguments without the program name; None reads ``sys.argv``.
    Returns:
        int: the sub-command's exit status.
    """
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    status = args.func(args)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
