"""Data: transform splicing, the synthetic demo dataset and small real benchmarks."""

from .datasets import (  # noqa: E402  (importing registers the datasets)
    NUM_SPLITS,
    PRID450S,
    SyntheticReID,
    VIPeRSingleShot,
    dataset_kwargs,
    dataset_num_splits,
    summarize_splits,
    synthetic_kwargs,
)
from .transforms import (  # noqa: E402
    build_registered_transforms,
    build_transforms_with_registry,
    splice,
)

__all__ = [
    "NUM_SPLITS",
    "PRID450S",
    "SyntheticReID",
    "VIPeRSingleShot",
    "build_registered_transforms",
    "build_transforms_with_registry",
    "dataset_kwargs",
    "dataset_num_splits",
    "splice",
    "summarize_splits",
    "synthetic_kwargs",
]
