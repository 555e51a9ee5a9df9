"""PMM's config nodes, ``cfg.MODEL.PMM`` and ``cfg.INPUT.PMM_CUTOUT`` (arXiv 2007.08779)."""

from reidzoo.config import add_node, register_config


@register_config
def add_pmm_config(cfg):
    """Add ``MODEL.PMM`` and ``INPUT.PMM_CUTOUT``; idempotent, never overwrites existing keys.

    Args:
        cfg (CfgNode): root config, modified in place.
    """
    add_node(
        cfg,
        "MODEL.PMM",
        {
            # Head layout: "pmm" = the three sequential stages I/II/III of §2.1 (Fig. 2);
            # "bdb" = BDB's two branches (global 512 + one 1024-d part branch) in the same
            # code, the layout PMM matches in parameters (§2.1 "same amount",
            # docs/decisions/pmm.md#budget).
            "LAYOUT": "pmm",
            # Stride of layer3 (§2.1 text: "stride to 1 in the 3rd and 4th blocks" = 1; the
            # official code keeps 2, docs/decisions/pmm.md#layer3-stride). layer4's is
            # MODEL.BACKBONE.LAST_STRIDE.
            "LAYER3_STRIDE": 2,
            # Feature augmentation feeding stages II and III (§2.2, §2.3, Tab. 3): "hard_mix"
            # (A-Hard-Mix, Eq. 2), "cutout" (CutOut [22]: zero the chosen blocks), "cutmix"
            # (feature-level CutMix [11]: random box from another sample, labels mixed),
            # "attentive_cutmix" (feature-level A-CutMix [12]: the partner's top-K Grad-CAM
            # blocks pasted, labels mixed), "bdb" (BDB [1] batch drop: one random stripe zeroed
            # for the whole batch), "none". The two CutMix modes are feature-level alternatives
            # of the paper's image-level rows (IMAGE_MIX below).
            "MIX": "hard_mix",
            # Block choice of hard_mix / cutout: "attentive" (block ranking on the previous
            # stage's Grad-CAM g, §2.2 Eq. 1) or "random" (K blocks uniformly, no Grad-CAM).
            "BLOCK_CHOICE": "attentive",
            # Number of block rows and columns of the block ranking. The paper fixes 3 x 2
            # blocks on the 24 x 8 map of its 384 x 128 input (§3.1; the official code's
            # CutMixBatchDrop hard-codes that 8 x 4 grid), so its K blocks are K / 32 of the
            # map: 9.375 % for K = 3. The block size is derived from the map, (H / 8, W / 4),
            # so the fraction stays K / 32 at every input size (2 x 2 at 256 x 128,
            # 1 x 1 at 128 x 64; docs/decisions/pmm.md#blocks); a map the grid does not
            # divide is refused.
            "BLOCK_GRID": [8, 4],
            # Optional cross-check of the derived block size [b_h, b_w]: [] (default) derives
            # it; a value must equal the derived size at INPUT.SIZE_TRAIN, else an error (e.g.
            # [3, 2] at 384 x 128). Kept so configs written with a fixed size still load.
            "BLOCK_SIZE": [],
            # K, the number of top-ranked blocks replaced (§3.1: 3 Market-1501, 6 DukeMTMC,
            # 8 CUHK03; the official code hard-codes 3).
            "TOPK": 3,
            # Image-level augmentation of the training batch before the backbone, a name in
            # reidzoo.projects.pmm.IMAGE_MIX_REGISTRY: "none", "PMMImageCutMix" (CutMix [11])
            # or "PMMImageAttentiveCutMix" (A-CutMix [12]: the partner's top-K blocks of
            # BLOCK_GRID over the image, by its stage-I Grad-CAM). Table 1: both rows of Table 3
            # are image-level and mix labels; their Table 3 configs set MIX none.
            "IMAGE_MIX": "none",
            # Probability that a batch is image-mixed (not given by PMM; CutMix's ImageNet
            # recipe mixes every batch).
            "IMAGE_MIX_PROB": 1.0,
            # Embedding size of each stage's reduction (§2.1: 512-d each, 1536-d test feature).
            "REDUCTION_DIM": 512,
            # Embedding size of BDB's part branch when LAYOUT is "bdb" (BDB: 1024).
            "BDB_PART_DIM": 1024,
            # BDB [1] batch-drop rectangle as fractions of the map's height and width, used when
            # MIX is "bdb" (PMM §2.3, Table 1; the PMM paper gives no values,
            # docs/decisions/pmm.md#bdb-ratios). From
            # BDB's official code (daizuozhuo/batch-dropblock-network, main_reid.py at e7653d1:
            # BFE(num_pids, width_ratio=1.0, height_ratio=0.33) for datatype "person", i.e. the
            # same for Market-1501, DukeMTMC-reID and CUHK03; 0.5 / 0.5 only for non-person
            # data); PMM's official main_reid.py keeps the same call. Rows dropped:
            # round(0.33 * 24) = 8 of 24 at 384x128 (0.3 would give 7).
            "BDB_HEIGHT_RATIO": 0.33,
            "BDB_WIDTH_RATIO": 1.0,
            # Beta(alpha, alpha) of CutMix's kept-area ratio lambda (CutMix [11]: alpha = 1),
            # feature-level (MIX cutmix) and image-level (IMAGE_MIX PMMImageCutMix).
            "CUTMIX_ALPHA": 1.0,
        },
    )
    add_node(
        cfg,
        "INPUT.PMM_CUTOUT",
        {
            # Probability of image-level Cutout (official code utils/transforms.py: 0.5;
            # docs/decisions/pmm.md#cutout).
            "PROB": 0.5,
            # Side of the square hole in pixels (code: 64).
            "SIZE": 64,
            # Fill with MODEL.PIXEL_MEAN, i.e. 0 after normalisation as the code's Cutout (it
            # runs after Normalize); False fills with FILL (0-255 scale).
            "FILL_MEAN": True,
            "FILL": 0.0,
        },
    )
