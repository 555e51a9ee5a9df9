"""PMM's training-time pieces: cheap exact Grad-CAM (docs/decisions/pmm.md#grad-cam), block
ranking (§2.2 Eq. 1), attentive Hard-Mix (Eq. 2) and the alternatives of Tab. 3 / BDB, all on
feature maps.

Block geometry: the paper ranks 3 x 2 blocks on the 24 x 8 map of a 384 x 128 input (§3.1;
official code ``CutMixBatchDrop``, which hard-codes that grid of 8 x 4 = 32 blocks), so its
top-K blocks are K / 32 of the map (K = 3: 18 / 192 = 9.375 %). Here the *grid* is fixed
(``MODEL.PMM.BLOCK_GRID``, [8, 4]) and the block size is derived from the map,
``(H / 8, W / 4)``, so the replaced fraction stays K / 32 at every input size; a map the grid
does not divide is refused (:func:`grid_block_size`).

Every function here is used in training only; none of them is part of the eval graph.
"""

import torch
from fastreid.config import configurable
from torch import nn

from reidzoo.modeling.arguments import (
    ArgumentError,
    arguments_of,
    check_choice,
    config_keys,
    read_keys,
)

#: The paper's block grid: its 24 x 8 map (384 x 128, stride 16) cut into 3 x 2 blocks.
PAPER_BLOCK_GRID = (24 // 3, 8 // 2)


def grad_cam(logits, targets, pooled, fmap, retain_graph=True):
    """Grad-CAM of the ground-truth-class score, computed through the small head only.

    With ``pooled = GAP(fmap)`` or ``GMP(fmap)``, the Grad-CAM weight of channel c (the spatial
    mean of d score / d fmap[c]) is ``(d score / d pooled_c) / (H W)`` in both cases, so one
    ``autograd.grad`` w.r.t. ``pooled`` gives the exact CAM (docs/decisions/pmm.md#grad-cam).
    No parameter ``.grad`` is written and no DDP reduction hook fires (only ``pooled`` is an
    input of the backward).

    Args:
        logits (Tensor): [N, num_classes], computed from ``pooled``.
        targets (Tensor): [N] int64 ground-truth classes; score = sum_i logits[i, y_i].
        pooled (Tensor): [N, C], the head input (must be part of ``logits``' graph).
        fmap (Tensor): [N, C, H, W], the map ``pooled`` was pooled from.
        retain_graph (bool): keep the graph for the loss backward (True in training).
    Returns:
        Tensor: [N, H, W] detached CAM, ``relu(sum_c alpha_c fmap_c)``.
    """
    score = logits.gather(1, targets.view(-1, 1)).sum()
    (g,) = torch.autograd.grad(score, pooled, retain_graph=retain_graph)
    h, w = fmap.shape[2], fmap.shape[3]
    alpha = g.detach() / float(h * w)
    return torch.relu(torch.einsum("nc,nchw->nhw", alpha, fmap.detach()))


def check_blocks(height, width, block_size, topk):
    """Raise ValueError unless b_h x b_w blocks tile an H x W map and K fits (§2.2).

    Args:
        height, width (int): map size.
        block_size (tuple[int, int]): (b_h, b_w).
        topk (int): K.
    Returns:
        tuple[int, int]: number of block rows and columns.
    """
    bh, bw = int(block_size[0]), int(block_size[1])
    if bh < 1 or bw < 1 or height % bh or width % bw:
        raise ValueError(
            f"MODEL.PMM.BLOCK_SIZE={list(block_size)} does not tile the {height}x{width} feature "
            "map (H and W must be multiples of b_h and b_w, §2.2; use [2, 2] at 256x128)"
        )
    nh, nw = height // bh, width // bw
    if not 0 <= topk <= nh * nw:
        raise ValueError(f"MODEL.PMM.TOPK={topk}; expected 0..{nh * nw} blocks")
    return nh, nw


def grid_block_size(height, width, grid, topk=0):
    """The block size that cuts an H x W map into the ``grid`` of blocks (§2.2, fixed grid).

    Keeping the number of blocks fixed keeps the replaced fraction, ``topk / (rows cols)``,
    the paper's at every map size (8 x 4 grid: K / 32, i.e. 3 x 2 blocks on 24 x 8, 2 x 2 on
    the 16 x 8 map of 256 x 128 (docs/decisions/pmm.md#blocks), 1 x 1 on 8 x 4, 6 x 4 on 48 x 16).

    Args:
        height, width (int): map size H, W.
        grid (tuple[int, int]): number of block rows and columns (``MODEL.PMM.BLOCK_GRID``).
        topk (int): K, checked against the number of blocks.
    Returns:
        tuple[int, int]: (b_h, b_w) = (H / rows, W / cols).
    Raises:
        ValueError: the grid does not divide the map, or K exceeds the number of blocks.
    """
    rows, cols = int(grid[0]), int(grid[1])
    if rows < 1 or cols < 1 or height % rows or width % cols:
        raise ValueError(
            f"MODEL.PMM.BLOCK_GRID={[rows, cols]} does not divide the {height}x{width} feature "
            f"map: the paper's fraction TOPK / {rows * cols} of blocks needs H a multiple of "
            f"{rows} and W of {cols} (e.g. INPUT.SIZE_TRAIN [128, 64] -> 8x4, [256, 128] -> "
            "16x8, [384, 128] -> 24x8 with MODEL.PMM.LAYER3_STRIDE 2 and "
            "MODEL.BACKBONE.LAST_STRIDE 1)"
        )
    if not 0 <= int(topk) <= rows * cols:
        raise ValueError(f"MODEL.PMM.TOPK={topk}; expected 0..{rows * cols} blocks")
    return height // rows, width // cols


def blocks_to_mask(keep, block_size):
    """[N, nh, nw] block mask -> [N, 1, nh b_h, nw b_w] pixel mask (each block repeated).

    Args:
        keep (Tensor): [N, nh, nw].
        block_size (tuple[int, int]): (b_h, b_w) in output pixels (map cells or image pixels).
    Returns:
        Tensor: [N, 1, nh b_h, nw b_w].
    """
    bh, bw = int(block_size[0]), int(block_size[1])
    return keep.repeat_interleave(bh, 1).repeat_interleave(bw, 2).unsqueeze(1)


def block_scores(cam, block_size):
    """e_i = sum of g over block b_i (§2.2 "Block Ranking").

    Args:
        cam (Tensor): [N, H, W].
        block_size (tuple[int, int]): (b_h, b_w), tiling H x W.
    Returns:
        Tensor: [N, H / b_h, W / b_w].
    """
    n, h, w = cam.shape
    bh, bw = int(block_size[0]), int(block_size[1])
    return cam.reshape(n, h // bh, bh, w // bw, bw).sum(dim=(2, 4))


def topk_block_mask(scores, topk, block_size):
    """Eq. 1: m_j = 0 inside the K blocks with the largest e_i, 1 elsewhere.

    Args:
        scores (Tensor): [N, nh, nw] block evidence e (or random keys for random choice).
        topk (int): K.
        block_size (tuple[int, int]): (b_h, b_w).
    Returns:
        Tensor: [N, 1, nh b_h, nw b_w] detached binary mask, dtype of ``scores``.
    """
    n, nh, nw = scores.shape
    flat = scores.detach().reshape(n, nh * nw)
    keep = torch.ones_like(flat)
    if topk > 0:
        idx = flat.topk(topk, dim=1).indices
        keep.scatter_(1, idx, 0.0)
    return blocks_to_mask(keep.view(n, nh, nw), block_size)


def attentive_mask(cam, topk, block_size):
    """Block ranking (§2.2): the CAM's top-K blocks zeroed.

    Args:
        cam (Tensor): [N, H, W] Grad-CAM g.
        topk (int): K.
        block_size (tuple[int, int]): (b_h, b_w).
    Returns:
        Tensor: [N, 1, H, W] detached {0, 1} mask.
    """
    check_blocks(cam.shape[1], cam.shape[2], block_size, topk)
    return topk_block_mask(block_scores(cam.detach(), block_size), topk, block_size)


def random_mask(n, height, width, topk, block_size, device=None, dtype=torch.float32):
    """K blocks chosen uniformly at random per sample (the non-attentive ablation).

    Args:
        n, height, width (int): batch and map size.
        topk (int): K.
        block_size (tuple[int, int]): (b_h, b_w).
    Returns:
        Tensor: [N, 1, H, W] {0, 1} mask.
    """
    nh, nw = check_blocks(height, width, block_size, topk)
    keys = torch.rand(n, nh, nw, device=device, dtype=dtype)
    return topk_block_mask(keys, topk, block_size)


def draw_negatives(targets):
    """For each anchor i, j drawn uniformly from {j : y_j != y_i} (label-based,
    docs/decisions/pmm.md#negatives).

    An anchor without any negative in the batch gets itself (its mix is then the identity).

    Args:
        targets (Tensor): [N] identity labels.
    Returns:
        Tensor: [N] int64 indices.
    """
    neg = (targets.view(-1, 1) != targets.view(1, -1)).float()
    none = neg.sum(1) == 0
    neg = neg + torch.diag(none.float())
    return torch.multinomial(neg, 1).view(-1)


def hard_mix(fmap, mask, index):
    """Eq. 2: f~ = m * f_a + (1 - m) * f_n with f_n = fmap[index]; gradients reach both.

    Args:
        fmap (Tensor): [N, C, H, W].
        mask (Tensor): [N, 1, H, W] in {0, 1}.
        index (Tensor): [N] partner of each anchor.
    Returns:
        Tensor: [N, C, H, W].
    """
    return mask * fmap + (1.0 - mask) * fmap[index]


def cutmix_box_mask(n, height, width, alpha, device=None, dtype=torch.float32):
    """CutMix [11]: one box of area ratio 1 - lambda, lambda ~ Beta(alpha, alpha), at a random
    centre, clipped to the map; lambda recomputed from the clipped box.

    Args:
        n, height, width (int): batch and map size (one box for the whole batch, as CutMix).
        alpha (float): Beta parameter.
    Returns:
        tuple[Tensor, float]: [N, 1, H, W] mask (0 inside the box) and the kept fraction.
    """
    lam = float(torch.distributions.Beta(alpha, alpha).sample()) if alpha > 0 else 0.5
    cut = (1.0 - lam) ** 0.5
    ch, cw = int(round(height * cut)), int(round(width * cut))
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch - ch // 2, height)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw - cw // 2, width)
    mask = torch.ones(n, 1, height, width, device=device, dtype=dtype)
    mask[:, :, y0:y1, x0:x1] = 0.0
    return mask, 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)


def batch_drop_mask(n, height, width, h_ratio, w_ratio, device=None, dtype=torch.float32):
    """BDB [1] batch DropBlock: one random h_ratio H x w_ratio W rectangle zeroed for every
    sample of the batch.

    Args:
        n, height, width (int): batch and map size.
        h_ratio, w_ratio (float): rectangle size as fractions of H and W.
    Returns:
        Tensor: [N, 1, H, W] {0, 1} mask.
    """
    rh, rw = int(round(h_ratio * height)), int(round(w_ratio * width))
    sy = int(torch.randint(height - rh + 1, ()))
    sx = int(torch.randint(width - rw + 1, ()))
    mask = torch.ones(n, 1, height, width, device=device, dtype=dtype)
    mask[:, :, sy : sy + rh, sx : sx + rw] = 0.0
    return mask


class FeatureMix(nn.Module):
    """The feature augmentation between two stages (§2.2-2.3), training only.

    Block-based modes (``hard_mix``, ``cutout``, ``attentive_cutmix``) cut each map into the
    fixed ``block_grid`` (block size derived from the map by :func:`grid_block_size`), so K
    blocks are always ``topk / (rows cols)`` of it.

    Built from explicit arguments (``FeatureMix()`` is the paper's attentive Hard-Mix of the 3
    most salient of 8 x 4 blocks, for a model of your own) or from a config,
    ``FeatureMix(cfg)`` (see :meth:`from_config`; how the ``PMM`` model builds it).

    Args:
        mode (str): "hard_mix", "cutout", "cutmix", "attentive_cutmix", "bdb" or "none".
        block_choice (str): "attentive" or "random" (hard_mix and cutout).
        block_grid (tuple[int, int]): number of block rows and columns (paper: 8 x 4).
        topk (int): K, 0..rows x cols.
        bdb_ratios (tuple[float, float]): BDB's (height, width) ratios, each in (0, 1].
        cutmix_alpha (float): CutMix's Beta parameter.
    Raises:
        reidzoo.modeling.arguments.ArgumentError: a wrong value, naming the argument (built
            from a config: a ``ValueError`` naming the config key).
    """

    MODES = ("hard_mix", "cutout", "cutmix", "attentive_cutmix", "bdb", "none")
    CHOICES = ("attentive", "random")
    BLOCK_MODES = ("hard_mix", "cutout", "attentive_cutmix")
    #: argument -> config key read by :meth:`from_config`
    CONFIG_KEYS = {
        "mode": "MODEL.PMM.MIX",
        "block_choice": "MODEL.PMM.BLOCK_CHOICE",
        "block_grid": "MODEL.PMM.BLOCK_GRID",
        "topk": "MODEL.PMM.TOPK",
        "cutmix_alpha": "MODEL.PMM.CUTMIX_ALPHA",
    }
    #: ``bdb_ratios`` comes from two keys
    BDB_KEYS = ("MODEL.PMM.BDB_HEIGHT_RATIO", "MODEL.PMM.BDB_WIDTH_RATIO")

    @configurable
    def __init__(self, mode="hard_mix", block_choice="attentive", block_grid=PAPER_BLOCK_GRID,
                 topk=3, bdb_ratios=(0.33, 1.0), cutmix_alpha=1.0):  # fmt: skip
        self.check_arguments(arguments_of(locals()))
        super().__init__()
        self.mode, self.block_choice = mode, block_choice
        self.block_grid = (int(block_grid[0]), int(block_grid[1]))
        self.topk = int(topk)
        self.bdb_ratios = (float(bdb_ratios[0]), float(bdb_ratios[1]))
        self.cutmix_alpha = float(cutmix_alpha)

    @classmethod
    def from_config(cls, cfg):
        """Constructor arguments from ``cfg.MODEL.PMM`` (:attr:`CONFIG_KEYS`, :attr:`BDB_KEYS`).

        Args:
            cfg (CfgNode): root config.
        Returns:
            dict: keyword arguments of ``__init__``.
        Raises:
            ValueError: a wrong value, naming its key.
        """
        args = read_keys(cfg, cls.CONFIG_KEYS)
        bdb = read_keys(cfg, {"height": cls.BDB_KEYS[0], "width": cls.BDB_KEYS[1]})
        args["bdb_ratios"] = [bdb["height"], bdb["width"]]
        keys = {**cls.CONFIG_KEYS, "bdb_ratios": "MODEL.PMM.BDB_HEIGHT_RATIO/BDB_WIDTH_RATIO"}
        with config_keys(keys):
            cls.check_arguments(args)
        return args

    @classmethod
    def check_arguments(cls, args):
        """Check the constructor's arguments (both construction paths run it).

        Args:
            args (dict): every argument of ``__init__``, by name.
        Raises:
            reidzoo.modeling.arguments.ArgumentError: naming the argument at fault.
        """
        own = "FeatureMix"
        check_choice(own, "mode", args["mode"], cls.MODES)
        check_choice(own, "block_choice", args["block_choice"], cls.CHOICES)
        grid = args["block_grid"]
        if len(grid) != 2 or any(not isinstance(v, int) or v < 1 for v in grid):
            raise ArgumentError(own, {"block_grid": grid}, "expected [rows, cols], both >= 1")
        blocks = grid[0] * grid[1]
        topk = args["topk"]
        if not isinstance(topk, int) or (args["mode"] in cls.BLOCK_MODES and
                                         not 0 <= topk <= blocks):  # fmt: skip
            raise ArgumentError(own, {"topk": topk}, f"expected 0..{blocks} blocks")
        ratios = args["bdb_ratios"]
        if len(ratios) != 2 or any(not isinstance(v, (int, float)) or not 0 < v <= 1
                                   for v in ratios):  # fmt: skip
            raise ArgumentError(own, {"bdb_ratios": ratios}, "expected (height, width) in (0, 1]")
        if not isinstance(args["cutmix_alpha"], (int, float)) or args["cutmix_alpha"] < 0:
            raise ArgumentError(own, {"cutmix_alpha": args["cutmix_alpha"]}, "expected >= 0")

    @property
    def num_blocks(self):
        """int: blocks per map, rows x cols of the grid (paper: 32)."""
        return self.block_grid[0] * self.block_grid[1]

    @property
    def uses_blocks(self):
        """bool: whether the mode cuts the map into the block grid."""
        return self.mode in self.BLOCK_MODES

    @property
    def block_fraction(self):
        """float: fraction of the map a block mode replaces (or zeroes), K / (rows cols)."""
        return self.topk / float(self.num_blocks)

    def block_size(self, height, width):
        """(b_h, b_w) on an H x W map; ValueError when the grid does not divide it."""
        return grid_block_size(height, width, self.block_grid, self.topk)

    @property
    def needs_cam(self):
        """bool: whether the previous stage's Grad-CAM is used."""
        if self.mode == "attentive_cutmix":
            return True
        return self.mode in ("hard_mix", "cutout") and self.block_choice == "attentive"

    @property
    def mixes_labels(self):
        """bool: CutMix and A-CutMix mix labels; A-Hard-Mix does not (§2.3)."""
        return self.mode in ("cutmix", "attentive_cutmix")

    def forward(self, fmap, cam, targets):
        """Args:
            fmap (Tensor): [N, C, H, W] map to augment (stage II/III input, unmixed).
            cam (Tensor | None): [N, H, W] previous stage's Grad-CAM (when ``needs_cam``).
            targets (Tensor): [N] labels.
        Returns:
            dict: ``features`` [N, C, H, W]; ``mask`` [N, 1, H, W] (1 = anchor kept);
            ``index`` [N] partner of each anchor (None for drops); ``lam`` (float, kept
            fraction for label mixing, 1.0 when labels are not mixed).
        """
        n, _, h, w = fmap.shape
        kw = {"device": fmap.device, "dtype": fmap.dtype}
        out = {"index": None, "lam": 1.0}
        if self.mode == "none":
            out.update(features=fmap, mask=torch.ones(n, 1, h, w, **kw))
            return out
        if self.mode == "bdb":
            mask = batch_drop_mask(n, h, w, *self.bdb_ratios, **kw)
            out.update(features=fmap * mask, mask=mask)
            return out
        if self.mode == "cutmix":
            mask, lam = cutmix_box_mask(n, h, w, self.cutmix_alpha, **kw)
            index = torch.randperm(n, device=fmap.device)
            out.update(features=hard_mix(fmap, mask, index), mask=mask, index=index, lam=lam)
            return out
        block = self.block_size(h, w)
        if self.mode == "attentive_cutmix":
            # the partner's K most salient blocks are pasted onto the anchor (A-CutMix [12])
            index = torch.randperm(n, device=fmap.device)
            mask = attentive_mask(cam[index], self.topk, block).to(fmap.dtype)
            lam = 1.0 - self.block_fraction
            out.update(features=hard_mix(fmap, mask, index), mask=mask, index=index, lam=lam)
            return out
        if self.block_choice == "attentive":
            mask = attentive_mask(cam, self.topk, block).to(fmap.dtype)
        else:
            mask = random_mask(n, h, w, self.topk, block, **kw)
        if self.mode == "cutout":
            out.update(features=fmap * mask, mask=mask)
            return out
        index = draw_negatives(targets)  # A-Hard-Mix: a different identity, labels kept
        out.update(features=hard_mix(fmap, mask, index), mask=mask, index=index)
        return out
