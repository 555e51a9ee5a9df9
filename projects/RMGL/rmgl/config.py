"""RMGL's config nodes, ``cfg.MODEL.RMGL`` and ``cfg.INPUT.RSA`` (Wang et al., TIP 2020)."""

from reidzoo.config import add_node, register_config


@register_config
def add_rmgl_config(cfg):
    """Add ``MODEL.RMGL`` and ``INPUT.RSA``; idempotent, never overwrites existing keys.

    Args:
        cfg (CfgNode): root config, modified in place.
    """
    add_node(
        cfg,
        "MODEL.RMGL",
        {
            # Stripe number n_s of each branch (§III-A: Local-2 and Local-3). 1 = a Global branch
            # (one global feature, no RP path); [2, 3, 4] / [1, 2, 3] = the trident variants of
            # §IV-D "Impact of the Branch Number"; [2] or [3] = the single-branch rows of Tab. V.
            "GRANULARITIES": [2, 3],
            # Where the shared trunk splits into branches (§IV-A: after res_conv2c = "layer1");
            # "layer3_0" = after res_conv4_1 as in fast-reid's MGN
            # (docs/decisions/rmgl.md#split-point).
            "SPLIT_AFTER": "layer1",
            # Paths per branch (§III-B, Tab. V): "dual" = original + receptive-partitioned,
            # "rp" = RP path only, "original" = no RP (the baseline rows).
            "PATHS": "dual",
            # Position of the receptive partition (§IV-D "Impact of Partition Depth", Fig. 9):
            # the map after which stripes are cut: "input" (input partition), "stem" (the map
            # fed into res_conv2, Fig. 9 "res2"), "layer1" (after res_conv2c = fed into
            # res_conv3, paper default), "layer2", "layer3" (fed into res_conv4 / res_conv5),
            # "layer4" (= output partition, OP); "layer3_0" only with the MGN-style split.
            "RP_POSITION": "layer1",
            # Activation-balanced pooling of the original path's local stripes (§III-C,
            # Eq. 8-10) at training / at test time (docs/decisions/rmgl.md#abp-phases: both).
            # Both False = uniform stripes (the "no ABP" rows of Tab. V).
            "ABP_TRAIN": True,
            "ABP_TEST": True,
            # Pooling inside ABP stripes: "max" (§III-A GMP, default) or "avg" (Eq. 11).
            "ABP_POOL": "max",
            # How Eq. 8 counts a channel whose spatial maximum is tied (all-zero channels
            # included): "strict" = Eq. 8's indicator is 1 only where every other position is
            # strictly smaller, so such a channel counts in no row (default); "first" = at its
            # first maximal position in row-major order (torch.argmax: an all-zero channel
            # counts at row 0), reidzoo's rule before this switch.
            "ABP_TIES": "strict",
            # Pooling of global features, uniform stripes and RP stripes: "max" (§III-A GMP)
            # or "avg".
            "POOL": "max",
            # Reduced feature dimension (§III-A: 1x1 conv + BN to 256-d per feature).
            "REDUCTION_DIM": 256,
            # ReLU after each reduction BN (§III-A names none; MGN-lineage code adds one).
            "REDUCTION_RELU": False,
            # Stride of each branch's layer4 copy (§IV-A: last stride 1;
            # docs/decisions/rmgl.md#branch-stride).
            "BRANCH_LAST_STRIDE": 1,
        },
    )
    add_node(
        cfg,
        "INPUT.RSA",
        {
            # Probability p of applying random shifting augmentation (§III-D; not given in
            # the paper; docs/decisions/rmgl.md#rsa: 0.5; 1.0 is the alternative).
            "PROB": 0.5,
            # Crop probability p_c (§IV-A, Fig. 7a: best 0.5).
            "CROP_PROB": 0.5,
            # Lower bound of the crop-height ratio r_c ~ U(RC_MIN, 1) (§IV-A, Fig. 7b: 0.7).
            "RC_MIN": 0.7,
            # Lower bound of the height resize ratio r_h ~ U(RH_MIN, 1 / r_c) (§III-D, Fig. 6).
            "RH_MIN": 0.5,
            # Lower bound of the width resize ratio r_w ~ U(RW_MIN, 1) (§IV-A, Fig. 7c).
            "RW_MIN": 0.5,
            # Canvas grey value (§III-D: 127 on each channel).
            "FILL": 127,
            # Only for RMGLCropResizeShift (the "RCRS" row of Tab. VI, §IV-D): the largest
            # translation |t_x| / W and |t_y| / H after crop-and-resize (our choice).
            "SHIFT_MAX": 0.2,
        },
    )
