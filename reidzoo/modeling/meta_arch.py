"""What every reidzoo meta-architecture shares: pixel normalisation and the device."""

import torch
from torch import nn

from reidzoo import compat


class ReidMetaArch(nn.Module):
    """Base class for paper meta-architectures, following fast-reid's ``Baseline`` contract.

    Holds ``pixel_mean``/``pixel_std`` buffers from ``MODEL.PIXEL_MEAN/STD`` and normalises
    images out of place (the caller's batch is never modified).

    Args:
        cfg (CfgNode)
    """

    def __init__(self, cfg):
        super().__init__()
        mean = torch.tensor(cfg.MODEL.PIXEL_MEAN, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(cfg.MODEL.PIXEL_STD, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("pixel_mean", mean, False)
        self.register_buffer("pixel_std", std, False)

    @property
    def device(self):
        """torch.device: where the model's buffers live."""
        return self.pixel_mean.device

    #: ``preprocess_image(batched_inputs) -> Tensor``: fast-reid batch dict or images
    #: [N, 3, H, W] (float 0-255) -> normalised [N, 3, H, W].
    preprocess_image = compat.preprocess_image
