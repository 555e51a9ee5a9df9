"""Data: transform splicing, the synthetic demo dataset and small real benchmarks."""

from reidzoo import compat

compat.apply()

from .transforms import (  # noqa: E402
    build_registered_transforms,
    build_transforms_with_registry,
    splice,
)

__all__ = ["build_registered_transforms", "build_transforms_with_registry", "splice"]
