"""Random shifting augmentation (RSA, §III-D, Fig. 6) and the "crop, resize and shift" pipeline
it is compared with (RCRS, §IV-D, Tab. VI), as registered PIL transforms usable by any model.

List them in ``INPUT.TRANSFORMS`` (``["RMGLRandomShift"]``); parameters in ``INPUT.RSA``.
Both run on the training pipeline only, on the already resized H x W PIL image.
"""

import random

from PIL import Image

from reidzoo.registry import TRANSFORM_REGISTRY


def _check_ratio(name, value, low=0.0, high=1.0):
    if not low <= value <= high:
        raise ValueError(f"INPUT.RSA.{name}={value}; expected a value in [{low}, {high}]")


class RandomShift:
    """RSA: crop (prob. p_c) a full-width band of height r_c H, resize it by (r_h, r_w), paste
    it at a random place of a grey H x W canvas (prob. p).

    ``r_c ~ U(rc_min, 1)`` when cropping, else 1; ``r_h ~ U(rh_min, 1 / r_c)`` so the pasted
    height ``r_h r_c H <= H``; ``r_w ~ U(rw_min, 1)``. The output size equals the input size.

    Args:
        prob (float): p.
        crop_prob (float): p_c.
        rc_min, rh_min, rw_min (float): lower bounds of r_c, r_h, r_w.
        fill (int): canvas grey value (127).
    """

    def __init__(self, prob=0.5, crop_prob=0.5, rc_min=0.7, rh_min=0.5, rw_min=0.5, fill=127):
        for name, v in (("PROB", prob), ("CROP_PROB", crop_prob)):
            _check_ratio(name, v)
        for name, v in (("RC_MIN", rc_min), ("RH_MIN", rh_min), ("RW_MIN", rw_min)):
            _check_ratio(name, v, 1e-3, 1.0)
        self.prob, self.crop_prob = float(prob), float(crop_prob)
        self.rc_min, self.rh_min, self.rw_min = float(rc_min), float(rh_min), float(rw_min)
        self.fill = int(fill)

    def __call__(self, img):
        """Args:
            img (PIL.Image.Image): H x W image.
        Returns:
            PIL.Image.Image: H x W image (``img`` itself when not applied)."""
        if self.prob <= 0 or random.random() >= self.prob:
            return img
        w, h = img.size
        rc = random.uniform(self.rc_min, 1.0) if random.random() < self.crop_prob else 1.0
        ch = max(1, min(h, round(rc * h)))
        top = random.randint(0, h - ch)
        patch = img.crop((0, top, w, top + ch))
        rh = random.uniform(min(self.rh_min, 1.0 / rc), 1.0 / rc)
        rw = random.uniform(self.rw_min, 1.0)
        nh = max(1, min(h, round(rh * ch)))
        nw = max(1, min(w, round(rw * w)))
        patch = patch.resize((nw, nh), Image.BILINEAR)
        return _paste(img, patch, random.randint(0, w - nw), random.randint(0, h - nh), self.fill)

    def __repr__(self):
        return (
            f"RMGLRandomShift(prob={self.prob}, crop_prob={self.crop_prob}, "
            f"rc_min={self.rc_min}, rh_min={self.rh_min}, rw_min={self.rw_min}, fill={self.fill})"
        )


class CropResizeShift:
    """RCRS (Tab. VI): crop a random region of arbitrary size (height ratio ~ U(rc_min, 1),
    width ratio ~ U(rw_min, 1)), resize it back to H x W, translate by (t_x, t_y) with
    ``|t| <= shift_max * size`` on a grey canvas; applied with probability p.

    Args:
        prob (float): p.
        rc_min, rw_min (float): lower bounds of the crop height / width ratios.
        shift_max (float): largest translation as a fraction of the image size.
        fill (int): canvas grey value.
    """

    def __init__(self, prob=0.5, rc_min=0.7, rw_min=0.5, shift_max=0.2, fill=127):
        _check_ratio("PROB", prob)
        _check_ratio("SHIFT_MAX", shift_max)
        self.prob, self.rc_min, self.rw_min = float(prob), float(rc_min), float(rw_min)
        self.shift_max, self.fill = float(shift_max), int(fill)

    def __call__(self, img):
        """Args:
            img (PIL.Image.Image): H x W image.
        Returns:
            PIL.Image.Image: H x W image."""
        if self.prob <= 0 or random.random() >= self.prob:
            return img
        w, h = img.size
        ch = max(1, round(random.uniform(self.rc_min, 1.0) * h))
        cw = max(1, round(random.uniform(self.rw_min, 1.0) * w))
        top, left = random.randint(0, h - ch), random.randint(0, w - cw)
        patch = img.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BILINEAR)
        tx = round(random.uniform(-self.shift_max, self.shift_max) * w)
        ty = round(random.uniform(-self.shift_max, self.shift_max) * h)
        return _paste(img, patch, tx, ty, self.fill)

    def __repr__(self):
        return f"RMGLCropResizeShift(prob={self.prob}, shift_max={self.shift_max})"


def _paste(img, patch, left, top, fill):
    canvas = Image.new(img.mode, img.size, (fill,) * len(img.getbands()))
    canvas.paste(patch, (left, top))
    return canvas


@TRANSFORM_REGISTRY.register()
def RMGLRandomShift(cfg, is_train):
    """Registered builder of :class:`RandomShift` from ``cfg.INPUT.RSA`` (training only).

    Args:
        cfg (CfgNode)
        is_train (bool)
    Returns:
        RandomShift | None: None for the test pipeline.
    """
    if not is_train:
        return None
    r = cfg.INPUT.RSA
    return RandomShift(r.PROB, r.CROP_PROB, r.RC_MIN, r.RH_MIN, r.RW_MIN, r.FILL)


RMGLRandomShift.stage = "pil"


@TRANSFORM_REGISTRY.register()
def RMGLCropResizeShift(cfg, is_train):
    """Registered builder of :class:`CropResizeShift` (Tab. VI "RCRS", training only).

    Args:
        cfg (CfgNode)
        is_train (bool)
    Returns:
        CropResizeShift | None: None for the test pipeline.
    """
    if not is_train:
        return None
    r = cfg.INPUT.RSA
    return CropResizeShift(r.PROB, r.RC_MIN, r.RW_MIN, r.SHIFT_MAX, r.FILL)


RMGLCropResizeShift.stage = "pil"
