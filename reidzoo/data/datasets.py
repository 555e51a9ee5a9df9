"""reidzoo's datasets, registered in fast-reid's ``DATASET_REGISTRY`` on import.

* ``SyntheticReID`` (:mod:`reidzoo.data.synthetic`): generated Market-1501-layout data;
* ``VIPeRSingleShot`` and ``PRID450S`` (:mod:`reidzoo.data.small`): real two-camera benchmarks,
  single-shot protocol, 10 seeded half splits.

fast-reid builds a dataset as ``DATASET_REGISTRY.get(name)(root=root, **kwargs)``;
:func:`dataset_kwargs` gives the ``kwargs`` that the config asks for.
"""

from reidzoo.config import add_node, register_config
from reidzoo.registry import DATASET_REGISTRY

from .small import (
    NUM_SPLITS,
    PRID450S,
    VIPeRSingleShot,
    split_identities,
    summarize_splits,
)
from .synthetic import SyntheticReID, synthetic_kwargs

__all__ = [
    "NUM_SPLITS",
    "PRID450S",
    "SPLIT_DATASETS",
    "SyntheticReID",
    "VIPeRSingleShot",
    "dataset_kwargs",
    "split_identities",
    "summarize_splits",
    "synthetic_kwargs",
]

#: Registry names of the datasets that take ``split_index``.
SPLIT_DATASETS = ("VIPeRSingleShot", "PRID450S")


def dataset_kwargs(cfg, name):
    """Keyword arguments (besides ``root``) to build dataset ``name`` as ``cfg`` asks.

    Args:
        cfg (CfgNode): root config.
        name (str): a registry name, e.g. ``"SyntheticReID"``, ``"PRID450S"``, ``"Market1501"``.
    Returns:
        dict: ``synthetic_kwargs(cfg)`` for ``SyntheticReID``, ``{"split_index":
        cfg.DATASETS.SPLIT_INDEX}`` for ``VIPeRSingleShot`` / ``PRID450S``, the box type and
        protocol of ``DATASETS.CUHK03`` (and ``split_id``) for ``CUHK03``, ``{}`` for any other
        registered dataset. fast-reid's dataset base class ignores keyword arguments it does
        not know, so the kwargs of several datasets can be merged into one dict.
    Raises:
        KeyError: ``name`` is not registered (the message lists the registered names).
    """
    DATASET_REGISTRY.get(name)  # fail early, with the list of names, on a typo
    if name == "SyntheticReID":
        return synthetic_kwargs(cfg)
    if name in SPLIT_DATASETS:
        return {"split_index": int(cfg.DATASETS.get("SPLIT_INDEX", 0))}
    if name == "CUHK03":
        c = cfg.DATASETS.CUHK03
        return {
            "cuhk03_labeled": bool(c.LABELED),
            "cuhk03_classic_split": bool(c.CLASSIC_SPLIT),
            "split_id": int(cfg.DATASETS.get("SPLIT_INDEX", 0)),
        }
    return {}


@register_config
def add_image_check_config(cfg):
    """``DATASETS.CHECK_IMAGES``: decode every train/query/gallery image before training.

    Args:
        cfg (CfgNode): root config, modified in place.
    """
    # True: the trainer decodes every image of DATASETS.NAMES and DATASETS.TESTS once when it
    # builds its loaders (results cached in $REIDZOO_CACHE, else ~/.cache/reidzoo) and names
    # every unreadable file in one error. False: an unreadable file fails when it is read.
    add_node(cfg, "DATASETS", {"CHECK_IMAGES": True})


@register_config
def add_cuhk03_config(cfg):
    """``DATASETS.CUHK03``: which boxes and protocol fast-reid's CUHK03 loader uses.

    Args:
        cfg (CfgNode): root config, modified in place.
    """
    add_node(
        cfg,
        "DATASETS.CUHK03",
        {
            # True: manually labelled boxes (fast-reid's default); False: detected boxes.
            "LABELED": True,
            # True: the classic 20-split protocol; False: the 767/700 "new" protocol.
            "CLASSIC_SPLIT": False,
        },
    )
