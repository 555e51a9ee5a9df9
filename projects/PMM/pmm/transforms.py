"""Image-level Cutout as the official PMM code applies it (``utils/transforms.py``;
docs/decisions/pmm.md#cutout), a registered tensor transform usable by any model:
``INPUT.TRANSFORMS: ["PMMCutout"]``.

It runs after fast-reid's ToTensor on the float 0-255 [3, H, W] image. The code's Cutout runs
after Normalize and fills 0, i.e. the pixel mean; ``INPUT.PMM_CUTOUT.FILL_MEAN`` reproduces that.
"""

import random

import torch

from reidzoo.registry import TRANSFORM_REGISTRY


class Cutout:
    """Cutout (DeVries & Taylor 2017): with probability p, a size x size square centred at a
    uniformly random pixel (clipped at the borders) is set to ``fill``.

    Args:
        prob (float): p.
        size (int): side of the square in pixels.
        fill (float | list[float]): per-channel fill value(s), 0-255 scale.
    """

    def __init__(self, prob=0.5, size=64, fill=0.0):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"INPUT.PMM_CUTOUT.PROB={prob}; expected a value in [0, 1]")
        if size < 0:
            raise ValueError(f"INPUT.PMM_CUTOUT.SIZE={size}; expected >= 0")
        self.prob, self.size = float(prob), int(size)
        self.fill = fill

    def __call__(self, img):
        """Args:
            img (Tensor): [C, H, W] float image.
        Returns:
            Tensor: [C, H, W] (a new tensor when applied, ``img`` otherwise)."""
        if self.prob <= 0 or self.size == 0 or random.random() >= self.prob:
            return img
        _, h, w = img.shape
        cy, cx = random.randrange(h), random.randrange(w)
        y0, y1 = max(cy - self.size // 2, 0), min(cy + self.size - self.size // 2, h)
        x0, x1 = max(cx - self.size // 2, 0), min(cx + self.size - self.size // 2, w)
        out = img.clone()
        fill = torch.as_tensor(self.fill, dtype=img.dtype).reshape(-1, 1, 1)
        out[:, y0:y1, x0:x1] = fill
        return out

    def __repr__(self):
        return f"PMMCutout(prob={self.prob}, size={self.size}, fill={self.fill})"


@TRANSFORM_REGISTRY.register()
def PMMCutout(cfg, is_train):
    """Registered builder of :class:`Cutout` from ``cfg.INPUT.PMM_CUTOUT`` (training only).

    Args:
        cfg (CfgNode)
        is_train (bool)
    Returns:
        Cutout | None: None for the test pipeline.
    """
    if not is_train:
        return None
    c = cfg.INPUT.PMM_CUTOUT
    fill = [float(v) for v in cfg.MODEL.PIXEL_MEAN] if c.FILL_MEAN else float(c.FILL)
    return Cutout(c.PROB, c.SIZE, fill)


PMMCutout.stage = "tensor"
