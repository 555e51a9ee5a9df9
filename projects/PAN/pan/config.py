"""PAN's config node, ``cfg.MODEL.PAN`` (Xiang et al., ACCV 2020)."""

from reidzoo.config import add_node, register_config


@register_config
def add_pan_config(cfg):
    """Add ``MODEL.PAN``; idempotent, never overwrites existing keys.

    Args:
        cfg (CfgNode): root config, modified in place.
    """
    add_node(
        cfg,
        "MODEL.PAN",
        {
            # Part extractor (Table 1): "plm" = learned multi-granularity parts (§3.2), or
            # "stripes" = horizontal stripe average pooling (PCB [5], Table 1 rows).
            "PARTS": "plm",
            # PLM granularity scales l: scale l learns l parts s_j^l (§3.2; Table 1 best
            # {1, 2, 3} = 6 parts).
            "SCALES": [1, 2, 3],
            # Number of horizontal stripes when PARTS is "stripes" (Table 1: 1 = global
            # pooling, 3, 6, 8).
            "NUM_STRIPES": 6,
            # Hidden width of PLM's spatial attention, the first of its "two stacked
            # Conv2D-BN-ReLU blocks" (§4.1; docs/decisions/pan.md#plm).
            "SA_DIM": 256,
            # Reduction ratio r of PLM's SE-style channel attention c^l, FC(C -> C/r) (§3.2
            # "follows [34]"; 16 is SE-Net's ratio, docs/decisions/pan.md#plm).
            "CA_REDUCTION": 16,
            # Last activation of the channel attention c^l: "sigmoid" (SE-Net,
            # docs/decisions/pan.md#plm) or "relu" (the literal §4.1 text).
            "CA_ACT": "sigmoid",
            # Last activation of PLM's spatial attention, i.e. of the masks s_j^l: "relu" (the
            # paper's "Conv2D-BN-ReLU") or "softplus" (not in the paper: a mask that cannot
            # die, tried because PAM's pairs cells end with all-zero scale-2 masks;
            # docs/decisions/pan.md#plm).
            "MASK_ACT": "relu",
            # Stages X^l connected to the part features P (§3.1, Fig. 1: blocks 1-3), by the
            # block CONNECTION names. Empty: the PLM baseline of Table 2 ("Baseline").
            "PAM_STAGES": ["layer1", "layer2", "layer3"],
            # Connection block of each stage in PAM_STAGES (Table 2, §4.2 "Feature fusion in
            # PAN"): "pam" = PAM, Eq. 1-3 (PAN_a / PAN_c); "conv" = Conv_a / Conv_c, a cascade
            # of Conv1x1(stride 2)-BN-ReLU blocks, one per later stage, channels doubled to C
            # for "add" (256->512->1024->2048 from X^1) or kept for "concat", its map pooled
            # with the PLM masks s_j (our reading: +7.49 M / +4.53 M vs the paper's +7.4 M /
            # +4.5 M, README); "identity" = X^l itself pooled with the masks (our reading of
            # Baseline_w: PAM_STAGES [layer3], concat, +1.57 M vs +1.4 M, README).
            "CONNECTION": "pam",
            # Stride of the last conv block of each Conv_a / Conv_c cascade (the one parallel
            # to layer4). The paper gives stride 2 for all blocks; with layer4 at stride 1 the
            # cascades end at half X^4's size and are upsampled (nearest) to it before the
            # mask pooling. 1 lands on X^4's grid directly. Parameters do not depend on it.
            "CONV_LAST_STRIDE": 2,
            # Inner dimension D of phi and psi per PAM stage (Eq. 2; Table 2: 128, 256, or
            # (256, 512, 1024); §4.2 chooses 256). Unused by the conv / identity connections.
            "PAM_DIMS": [256, 256, 256],
            # Normalisation of each PAM output Z^l, per channel over the batch and the parts
            # (fast-reid norm type, e.g. "BN"; "" = none, Eq. 1-3 literally). Not in the paper:
            # Z is trilinear in phi, psi, f and X^l, and without it Z's norm grows from ~6 to
            # 1e3-1e9 within a few SGD steps at the paper's LR 0.1 from random init, even with
            # cross-entropy alone (README, "Training from random initialisation").
            "PAM_NORM": "BN",
            # Fusion of P_i with the PAM outputs Z^l_i (Table 2): "concat" (PAN_c, the SOTA
            # model) or "add" (PAN_a; f maps C_l -> C of P).
            "FUSION": "concat",
            # Output width of each part's 1x1 embedding layer (§4.1, "256 for each embedding").
            "EMBED_DIM": 256,
            # Standard deviation of the normal initialisation of the bias-free part classifiers
            # (the paper names none; 0.001 is BNNeck's [47] and fast-reid's).
            "CLS_INIT_STD": 0.001,
            # BNNeck [47] after each embedding (§4.3 uses it for the SOTA numbers; Table 2 is
            # without it).
            "BNNECK": True,
            # Feature fed to the triplet loss: "before" (pre-BN embeddings, BNNeck
            # convention; docs/decisions/pan.md#triplet-feat) or "after" the BNNeck.
            "TRIPLET_FEAT": "before",
            # Test feature: "after" (the 6 post-BN embeddings, docs/decisions/pan.md#test-feat)
            # or "before".
            "TEST_FEAT": "after",
            # lambda_2, the weight of the orthogonal regularisation L_orth (Eq. 4-5; §4.1
            # "10^-3", the minus sign lost in §4.2's text, docs/decisions/pan.md#lambda2).
            # 0 disables it.
            "ORTH_WEIGHT": 1e-3,
            # Rows of M^l in Eq. 4: "raw" flattened masks s_j^l (literal,
            # docs/decisions/pan.md#orth-masks) or
            # "normalized" (each row divided by its L2 norm).
            "ORTH_MASKS": "raw",
            # Stages followed by a non-local block (Table 2 "NL" and "PAN_c + NL"; §4.2: after
            # blocks 1-3, dot product, inter-channels C/2, downsampled). Empty: none.
            "NL_STAGES": [],
            # Non-local inter-channel reduction: C / NL_REDUCTION (§4.2 "half").
            "NL_REDUCTION": 2,
            # Non-local 2x2 max-pool of phi and g (§4.2 "we also downsample the feature map").
            "NL_SUBSAMPLE": True,
        },
    )
