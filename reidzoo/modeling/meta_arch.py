"""What every reidzoo meta-architecture shares: pixel normalisation, the device, and losses
that work outside a trainer. Also the out-of-place normalisation reidzoo's build path gives
fast-reid's ``Baseline`` and ``MGN`` (:func:`normalize_out_of_place`)."""

import contextlib
import logging
import types

import torch
from torch import nn

logger = logging.getLogger(__name__)


def preprocess_image(self, batched_inputs):
    """Normalise images out of place (fast-reid's ``Baseline.preprocess_image`` writes into the
    caller's tensor with ``sub_``/``div_``, so its own flip test normalises twice).

    Args:
        self (nn.Module): with ``pixel_mean`` and ``pixel_std`` buffers [1, 3, 1, 1].
        batched_inputs (dict | Tensor): fast-reid batch dict with "images", or images
            [N, 3, H, W] as float 0-255.
    Returns:
        Tensor: [N, 3, H, W] normalised by ``pixel_mean``/``pixel_std``; the input is unchanged.
    """
    if isinstance(batched_inputs, dict):
        images = batched_inputs["images"]
    elif isinstance(batched_inputs, torch.Tensor):
        images = batched_inputs
    else:
        raise TypeError(
            f"batched_inputs must be a dict or a Tensor, got {type(batched_inputs).__name__}"
        )
    return (images.to(self.pixel_mean.device) - self.pixel_mean) / self.pixel_std


def normalize_out_of_place(model):
    """Give a model built from fast-reid's ``Baseline`` or ``MGN`` class reidzoo's behaviour, on
    that instance only (fast-reid's classes, and every model built outside reidzoo's build
    path, keep fast-reid's code):

    * out-of-place normalisation (:func:`preprocess_image`);
    * a training-mode forward outside a trainer runs in a throwaway ``EventStorage``
      (:func:`event_storage`), as :class:`ReidMetaArch` does.

    Args:
        model (nn.Module)
    Returns:
        nn.Module: ``model``.
    """
    from fastreid.modeling.meta_arch import MGN, Baseline

    if type(model) in (Baseline, MGN):
        model.preprocess_image = types.MethodType(preprocess_image, model)
        model.forward = types.MethodType(_forward_in_storage, model)
    return model


def _forward_in_storage(self, *args, **kwargs):
    forward = type(self).forward
    if not self.training:
        return forward(self, *args, **kwargs)
    with event_storage():
        return forward(self, *args, **kwargs)


@contextlib.contextmanager
def event_storage():
    """fast-reid's current ``EventStorage``, or a throwaway one when no trainer runs.

    fast-reid's losses log their accuracy to the current storage and assert that there is one,
    so a training-mode forward outside a trainer (a test, a notebook, a benchmark) fails; inside
    this context it runs and what it logs is discarded.

    Yields:
        fastreid.utils.events.EventStorage
    """
    from fastreid.utils import events

    if events._CURRENT_STORAGE_STACK:
        yield events._CURRENT_STORAGE_STACK[-1]
        return
    with events.EventStorage() as storage:
        yield storage


class ReidMetaArch(nn.Module):
    """Base class for paper meta-architectures, following fast-reid's ``Baseline`` contract.

    Holds ``pixel_mean``/``pixel_std`` buffers from ``MODEL.PIXEL_MEAN/STD`` and normalises
    images out of place (the caller's batch is never modified). A training-mode call outside a
    trainer runs in a throwaway ``EventStorage`` (:func:`event_storage`). Reads fast-reid's
    loss settings once: ``loss_names`` (``MODEL.LOSSES.NAME``), ``ce`` = (EPSILON, ALPHA, SCALE) of
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
    preprocess_image = preprocess_image

    def __call__(self, *args, **kwargs):
        # Training-mode losses log to fast-reid's EventStorage; outside a trainer there is none
        # and fast-reid asserts, so run in a throwaway one (inside a trainer: the trainer's).
        if not self.training:
            return super().__call__(*args, **kwargs)
        with event_storage():
            return super().__call__(*args, **kwargs)
