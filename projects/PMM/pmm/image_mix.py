"""Image-level CutMix [11] and Attentive CutMix [12], the Table 3 rows as the paper describes
them (§2.3, Table 1: both augment and mix *images* and mix the labels), for PMM's training
forward. ``MODEL.PMM.IMAGE_MIX`` names one of :data:`IMAGE_MIX_REGISTRY`; the feature-level
versions (``MODEL.PMM.MIX`` ``cutmix`` / ``attentive_cutmix``) stay as labelled alternatives.

A mix runs on the whole normalised batch before the backbone (it needs partners from the
batch, so it cannot be a per-image transform); mixing normalised or 0-255 images is the same
because normalisation is a per-channel affine map. Every stage's CE is then mixed as
``lam CE(y) + (1 - lam) CE(y[index])``; the triplet keeps the anchors' labels.
"""

import torch
from fastreid.utils.registry import Registry
from torch import nn

from .modules import block_scores, cutmix_box_mask, grid_block_size, hard_mix, topk_block_mask

IMAGE_MIX_REGISTRY = Registry("PMM_IMAGE_MIX")
IMAGE_MIX_REGISTRY.__doc__ = """
Batch-level image augmentations of PMM's training forward (``MODEL.PMM.IMAGE_MIX``).

An entry is a class called as ``obj(cfg)``; the instance is called as
``mix(images, targets, cam_fn)`` with the normalised batch [N, 3, H, W], the labels [N] and
``cam_fn(images, targets) -> [N, h, w]`` (the model's stage-I Grad-CAM of the clean batch), and
returns a dict: ``images`` [N, 3, H, W], ``mask`` [N, 1, H, W] (1 = anchor pixel kept),
``index`` [N] partner of each anchor (None when not applied) and ``lam`` (label weight of the
anchor, 1.0 when not applied).
"""

NONE = ("", "none")


def build_image_mix(cfg):
    """Build ``cfg.MODEL.PMM.IMAGE_MIX`` from :data:`IMAGE_MIX_REGISTRY`.

    Args:
        cfg (CfgNode)
    Returns:
        nn.Module | None: None for "none".
    """
    name = cfg.MODEL.PMM.IMAGE_MIX
    if name in NONE:
        return None
    try:
        cls = IMAGE_MIX_REGISTRY.get(name)
    except KeyError:
        known = ["none", *sorted(IMAGE_MIX_REGISTRY._obj_map)]
        raise ValueError(f"MODEL.PMM.IMAGE_MIX={name!r}; expected one of {known}") from None
    return cls(cfg)


class _ImageMix(nn.Module):
    """Common part: the probability of mixing a batch (``MODEL.PMM.IMAGE_MIX_PROB``)."""

    #: both image-level rows of Table 1 mix the labels
    mixes_labels = True
    #: whether ``cam_fn`` is called (the clean-batch Grad-CAM costs a backbone forward)
    needs_cam = False

    def __init__(self, cfg):
        super().__init__()
        prob = float(cfg.MODEL.PMM.IMAGE_MIX_PROB)
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"MODEL.PMM.IMAGE_MIX_PROB={prob}; expected a value in [0, 1]")
        self.prob = prob

    def _skip(self, images):
        """The unmixed batch, returned when this batch is not mixed (probability 1 - p)."""
        n, _, h, w = images.shape
        mask = torch.ones(n, 1, h, w, device=images.device, dtype=images.dtype)
        return {"images": images, "mask": mask, "index": None, "lam": 1.0}

    def _drawn(self):
        """bool: mix this batch (one draw from torch's generator, seeded per epoch)."""
        return self.prob >= 1.0 or (self.prob > 0.0 and float(torch.rand(())) < self.prob)


@IMAGE_MIX_REGISTRY.register()
class PMMImageCutMix(_ImageMix):
    """CutMix [11] on images: one box of area ratio 1 - lam, lam ~ Beta(alpha, alpha)
    (``MODEL.PMM.CUTMIX_ALPHA``), at a uniform centre, clipped, for the whole batch; the box
    comes from a random permutation of the batch; lam is recomputed from the clipped box.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        self.alpha = float(cfg.MODEL.PMM.CUTMIX_ALPHA)

    def forward(self, images, targets, cam_fn=None):
        """Args:
            images (Tensor): [N, 3, H, W] normalised.
            targets (Tensor): [N] (unused: CutMix's partner is any sample).
            cam_fn: unused.
        Returns:
            dict: see :data:`IMAGE_MIX_REGISTRY`.
        """
        if not self._drawn():
            return self._skip(images)
        n, _, h, w = images.shape
        mask, lam = cutmix_box_mask(n, h, w, self.alpha, device=images.device,
                                    dtype=images.dtype)  # fmt: skip
        index = torch.randperm(n, device=images.device)
        return {"images": hard_mix(images, mask, index), "mask": mask, "index": index, "lam": lam}


@IMAGE_MIX_REGISTRY.register()
class PMMImageAttentiveCutMix(_ImageMix):
    """Attentive CutMix [12] on images: the partner's K most salient blocks of the
    ``MODEL.PMM.BLOCK_GRID`` (rows x cols over the image), ranked by the partner's stage-I
    Grad-CAM of the clean batch, are pasted onto the anchor at the same place; lam = 1 - K /
    (rows cols), the anchor's kept area.

    The attention comes from the model being trained (``cam_fn``, in eval mode: [12] uses a
    separately pretrained network, which the PMM paper does not name).
    """

    needs_cam = True

    def __init__(self, cfg):
        super().__init__(cfg)
        p = cfg.MODEL.PMM
        self.grid = (int(p.BLOCK_GRID[0]), int(p.BLOCK_GRID[1]))
        self.topk = int(p.TOPK)
        if not 0 <= self.topk <= self.grid[0] * self.grid[1]:
            raise ValueError(
                f"MODEL.PMM.TOPK={self.topk}; expected 0..{self.grid[0] * self.grid[1]} blocks"
            )

    @property
    def block_fraction(self):
        """float: fraction of each image pasted from the partner, K / (rows cols)."""
        return self.topk / float(self.grid[0] * self.grid[1])

    def check_image(self, height, width):
        """Raise ValueError unless the block grid divides an H x W image.

        Returns:
            tuple[int, int]: the block size in pixels.
        """
        rows, cols = self.grid
        if height % rows or width % cols:
            raise ValueError(
                f"MODEL.PMM.IMAGE_MIX={type(self).__name__}: MODEL.PMM.BLOCK_GRID="
                f"{[rows, cols]} does not divide the {height}x{width} training image "
                f"(INPUT.SIZE_TRAIN): its height must be a multiple of {rows} and its width of "
                f"{cols}"
            )
        return height // rows, width // cols

    def forward(self, images, targets, cam_fn):
        """Args:
            images (Tensor): [N, 3, H, W] normalised.
            targets (Tensor): [N] labels (for the Grad-CAM of the ground-truth class).
            cam_fn: ``(images, targets) -> [N, h, w]`` clean-batch Grad-CAM.
        Returns:
            dict: see :data:`IMAGE_MIX_REGISTRY`.
        """
        if not self._drawn():
            return self._skip(images)
        n, _, h, w = images.shape
        pixels = self.check_image(h, w)
        cam = cam_fn(images, targets).detach()
        cells = grid_block_size(cam.shape[1], cam.shape[2], self.grid, self.topk)
        index = torch.randperm(n, device=images.device)
        scores = block_scores(cam[index], cells)  # [N, rows, cols]: the partner's evidence
        mask = topk_block_mask(scores, self.topk, pixels).to(images.dtype)
        lam = 1.0 - self.block_fraction
        return {"images": hard_mix(images, mask, index), "mask": mask, "index": index, "lam": lam}
