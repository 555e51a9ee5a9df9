"""Training and evaluation entry points."""

from .launch import default_argument_parser, launch, main, setup  # noqa: E402
from .trainer import ReidTrainer, build_dataset, prepare_cfg  # noqa: E402

__all__ = [
    "ReidTrainer",
    "build_dataset",
    "default_argument_parser",
    "launch",
    "main",
    "prepare_cfg",
    "setup",
]
