"""IANet's config node, ``cfg.MODEL.IANET`` (Hou et al., CVPR 2019)."""

from reidzoo.config import add_node, register_config


@register_config
def add_ianet_config(cfg):
    """Add ``MODEL.IANET``; idempotent, never overwrites existing keys.

    Args:
        cfg (CfgNode): root config, modified in place.
    """
    add_node(
        cfg,
        "MODEL.IANET",
        {
            # Context patch sizes K of the multi-context interaction (Eq. 1-2; N = len, §4.1
            # uses K = 1, 2, 3). One entry = single-context SIA (Tab. 4a). Even K is anchored
            # top-left: offsets {0, 1} for K = 2 (docs/decisions/ianet.md#k2-anchor).
            "CONTEXTS": [1, 2, 3],
            # Fusion function F of Eq. 2 and Eq. 5: "prod" (paper default), "sum" or "max"
            # (Tab. 4b).
            "FUSION": "prod",
            # Normalisation after fusion: "softmax" = the paper's literal softmax of the fused
            # probabilities (Eq. 2, 5; nearly uniform,
            # docs/decisions/ianet.md#fusion-norm), "renorm" = fused / row sum.
            "FUSION_NORM": "softmax",
            # Divide appearance logits by sqrt(C) (authors' code IA.py L79; Eq. 1 has none).
            "SCALE": True,
            # Relation map used for SIA's aggregation (Tab. 4c): "semantic" (S, Eq. 5),
            # "appearance" (S^A, Eq. 2) or "location" (S^L, Eq. 4).
            "RELATION": "semantic",
            # Location Gaussian (sigma_1 along the width x, sigma_2 along the height y), Eq. 3,
            # per stage the block follows. §4.1: (10, 20) after stage 2, (5, 10) after stage 3;
            # stages 1 and 4 (Tab. 4e only) are our decision: (20, 40) and (5, 10).
            "SIGMA_LAYER1": [20.0, 40.0],
            "SIGMA_LAYER2": [10.0, 20.0],
            "SIGMA_LAYER3": [5.0, 10.0],
            "SIGMA_LAYER4": [5.0, 10.0],
            # Arrangement inside an IA block (Tab. 4d): "spatial_channel" (SIA then CIA,
            # paper default), "channel_spatial", "parallel", or a single block "spatial" /
            # "channel".
            "ARRANGEMENT": "spatial_channel",
            # Stages whose *every* residual block is followed by an IA block (Tab. 4f
            # "stage23-c"); used by build_ianet_backbone. Empty: blocks only where
            # MODEL.BACKBONE.INSERTS puts them (the stage outputs, "bottlenecks").
            "EVERY_BLOCK_STAGES": [],
        },
    )
