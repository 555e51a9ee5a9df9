"""reidzoo models inside other libraries' pipelines.

``BoxMOTReID`` (:mod:`reidzoo.integrations.tracking`): any reidzoo model as the ``reid_model``
of a BoxMOT tracker (BotSort, StrongSort, DeepOcSort, ...), run in PyTorch.
"""

from reidzoo.integrations.tracking import BoxMOTReID, crop_boxes

__all__ = ["BoxMOTReID", "crop_boxes"]
