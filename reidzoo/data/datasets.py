"""reidzoo's datasets, registered in fast-reid's ``DATASET_REGISTRY`` on import.

* ``SyntheticReID`` (:mod:`reidzoo.data.synthetic`): generated Market-1501-layout data;
* ``VIPeRSingleShot`` and ``PRID450S`` (:mod:`reidzoo.data.small`): real two-camera benchmarks,
  single-shot protocol, 10 seeded half splits.

How reidzoo builds any registered dataset (README "Datasets: what a dataset must be"):
``DATASET_REGISTRY.get(name)(root=<absolute DATASETS.ROOT>, combineall=DATASETS.COMBINEALL,
**dataset_kwargs(cfg, name))``. :func:`dataset_kwargs` is the one way config values reach a
dataset: its class's ``from_config(cfg)`` (a classmethod returning constructor keywords, the
convention of fast-reid's ``@configurable``), plus ``split_index=DATASETS.SPLIT_INDEX`` for a
dataset that declares ``num_splits``. fast-reid's own classes cannot carry a ``from_config``;
reidzoo keeps theirs in :data:`FASTREID_FROM_CONFIG`.
"""

import logging

from reidzoo.config import add_node, register_config
from reidzoo.plugins import lookup
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
    "FASTREID_FROM_CONFIG",
    "NUM_SPLITS",
    "PRID450S",
    "SyntheticReID",
    "VIPeRSingleShot",
    "dataset_kwargs",
    "dataset_num_splits",
    "split_identities",
    "summarize_splits",
    "synthetic_kwargs",
]

logger = logging.getLogger(__name__)
_KEY = "DATASETS.NAMES / DATASETS.TESTS"
_WARNED = set()  # (dataset, split index) pairs already warned about


def _cuhk03_from_config(cfg):
    c = cfg.DATASETS.CUHK03
    return {
        "cuhk03_labeled": bool(c.LABELED),
        "cuhk03_classic_split": bool(c.CLASSIC_SPLIT),
        "split_id": int(cfg.DATASETS.get("SPLIT_INDEX", 0)),
    }


#: ``from_config`` of fast-reid's own dataset classes (which reidzoo cannot add a method to):
#: registry name -> (function cfg -> constructor keywords, function cfg -> number of splits,
#: or None when it has none). CUHK03's classic protocol has 20 splits, the new one 1.
FASTREID_FROM_CONFIG = {
    "CUHK03": (_cuhk03_from_config, lambda cfg: 20 if cfg.DATASETS.CUHK03.CLASSIC_SPLIT else 1),
}


def _fastreid_entry(name, cls):
    entry = FASTREID_FROM_CONFIG.get(name)
    return entry if entry is not None and cls.__module__.startswith("fastreid.") else None


def dataset_num_splits(cfg, name):
    """How many standard splits dataset ``name`` has (``DATASETS.SPLIT_INDEX`` 0..n-1).

    Args:
        cfg (CfgNode): root config.
        name (str): a registry name.
    Returns:
        int | None: the class attribute ``num_splits`` (fast-reid's CUHK03: 20 under
        ``DATASETS.CUHK03.CLASSIC_SPLIT``, else 1); None for a dataset without splits, which
        ``DATASETS.SPLIT_INDEX`` does not reach.
    Raises:
        KeyError: no loaded module or plugin registers ``name`` (the message lists the
            registered names and any plugin that failed to import).
    """
    cls = lookup(DATASET_REGISTRY, name, _KEY)
    entry = _fastreid_entry(name, cls)
    if entry is not None:
        return entry[1](cfg)
    n = getattr(cls, "num_splits", None)
    return None if n is None else int(n)


def dataset_kwargs(cfg, name):
    """Keyword arguments (besides ``root`` and ``combineall``) to build dataset ``name`` as
    ``cfg`` asks: the one way config values reach a registered dataset.

    * ``cls.from_config(cfg)`` when the class defines it (a classmethod returning a dict of
      constructor keywords; reidzoo's ``SyntheticReID`` reads ``DATASETS.SYNTHETIC`` this way),
      or the entry of :data:`FASTREID_FROM_CONFIG` for fast-reid's own classes;
    * ``split_index=DATASETS.SPLIT_INDEX`` when the class declares ``num_splits`` (and
      ``from_config`` did not set it), as ``VIPeRSingleShot`` and ``PRID450S`` do.

    A dataset with neither gets ``{}``. A ``DATASETS.SPLIT_INDEX`` other than 0 that reaches no
    split of the dataset is logged as a warning naming it, since the same config may split
    another of its datasets.

    Args:
        cfg (CfgNode): root config.
        name (str): a registry name, e.g. ``"SyntheticReID"``, ``"PRID450S"``, ``"Market1501"``.
    Returns:
        dict: constructor keywords.
    Raises:
        KeyError: no loaded module or plugin registers ``name`` (the message lists the
            registered names and any plugin that failed to import).
        TypeError: ``from_config`` returned something other than a dict (names the class).
    """
    cls = lookup(DATASET_REGISTRY, name, _KEY)  # a plugin's dataset loads its plugin
    entry = _fastreid_entry(name, cls)
    from_config = entry[0] if entry is not None else getattr(cls, "from_config", None)
    kwargs = {} if from_config is None else from_config(cfg)
    if not isinstance(kwargs, dict):
        raise TypeError(
            f"{cls.__module__}.{cls.__qualname__}.from_config(cfg) returned "
            f"{type(kwargs).__name__}; expected a dict of constructor keywords"
        )
    kwargs = dict(kwargs)
    split = int(cfg.DATASETS.get("SPLIT_INDEX", 0))
    if entry is None and getattr(cls, "num_splits", None) is not None:
        kwargs.setdefault("split_index", split)
    elif split != 0 and entry is None and (name, split) not in _WARNED:
        _WARNED.add((name, split))
        logger.warning(
            "DATASETS.SPLIT_INDEX %d does not reach dataset %s: it declares no num_splits "
            "(README, Datasets), so it is built the same for every split index",
            split,
            name,
        )
    return kwargs


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
