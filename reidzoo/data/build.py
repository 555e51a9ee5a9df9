"""Building registered datasets under the configured root, with errors that say what is wrong."""

import os

from reidzoo.config import dataset_root
from reidzoo.registry import DATASET_REGISTRY

#: Expected folder layouts, for the error raised when a dataset root is missing.
KNOWN_LAYOUTS = {
    "Market1501": "<root>/Market-1501-v15.09.15/{bounding_box_train,query,bounding_box_test}",
    "DukeMTMC": "<root>/DukeMTMC-reID/{bounding_box_train,query,bounding_box_test}",
    "MSMT17": "<root>/MSMT17_V2/{mask_train_v2,mask_test_v2,list_*.txt}",
    "CUHK03": "<root>/cuhk03/cuhk03_release/cuhk-03.mat (+ splits)",
}


def build_dataset(cfg, name):
    """Instantiate a registered dataset under the configured root.

    Args:
        cfg (CfgNode)
        name (str): registry name (``DATASETS.NAMES`` / ``DATASETS.TESTS`` entry).
    Returns:
        fastreid.data.datasets.bases.ImageDataset
    """
    from reidzoo.data.datasets import dataset_kwargs

    root = dataset_root(cfg)
    cls = DATASET_REGISTRY.get(name)
    if not os.path.isdir(root) and name in KNOWN_LAYOUTS:
        raise FileNotFoundError(
            f"dataset root '{os.path.abspath(root)}' does not exist (DATASETS.ROOT or "
            f"$FASTREID_DATASETS); {name} expects {KNOWN_LAYOUTS[name]}"
        )
    try:
        return cls(root=root, combineall=cfg.DATASETS.COMBINEALL, **dataset_kwargs(cfg, name))
    except RuntimeError as e:  # fast-reid's check_before_run: '"<dir>" is not found'
        if "is not found" in str(e):
            layout = KNOWN_LAYOUTS.get(name, "its documented layout")
            raise FileNotFoundError(f"{name}: {e} under root '{root}'; expected {layout}") from e
        raise
