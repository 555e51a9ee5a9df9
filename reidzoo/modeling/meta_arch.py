"""What every reidzoo meta-architecture shares: pixel normalisation and the device."""

import torch
from torch import nn

from reidzoo import compat


class ReidMetaArch(nn.Module):
    """Base class for paper meta-architectures, following fast-reid's ``Baseline`` contract.

    Holds ``pixel_mean``/``pixel_std`` buffers from ``MODEL.PIXEL_MEAN/STD`` and normalises
    images out of place (the caller's batch is never modified). Reads fast-reid's loss settings
    once: ``loss_names`` (``MODEL.LOSSES.NAME``), ``ce`` = (EPSILON, ALPHA, SCALE) of
    ``MODEL.LOSSES.CE`` and ``tri`` = (MARGIN, NORM_FEAT, HARD_MINING, SCALE) of
    ``MODEL.LOSSES.TRI``.

    Args:
        cfg (CfgNode)
    """

    def __init__(self, cfg):
        super().__init__()
        mean = torch.tensor(cfg.MODEL.PIXEL_MEAN, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(cfg.MODEL.PIXEL_STD, dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("pixel_mean", mean, False)
        self.register_buffer("pixel_std", std, False)
        loss = cfg.MODEL.LOSSES
        self.loss_names = tuple(loss.NAME)
        self.ce = (float(loss.CE.EPSILON), float(loss.CE.ALPHA), float(loss.CE.SCALE))
        self.tri = (
            float(loss.TRI.MARGIN),
            bool(loss.TRI.NORM_FEAT),
            bool(loss.TRI.HARD_MINING),
            float(loss.TRI.SCALE),
        )

    @property
    def device(self):
        """torch.device: where the model's buffers live."""
        return self.pixel_mean.device

    #: ``preprocess_image(batched_inputs) -> Tensor``: fast-reid batch dict or images
    #: [N, 3, H, W] (float 0-255) -> normalised [N, 3, H, W].
    preprocess_image = compat.preprocess_image
