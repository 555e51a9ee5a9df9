"""PFE's config node, ``cfg.MODEL.PFE`` (progressive feature enhancement, TIP)."""

from reidzoo.config import add_node, register_config


@register_config
def add_pfe_config(cfg):
    """Add ``MODEL.PFE``; idempotent, never overwrites existing keys.

    Args:
        cfg (CfgNode): root config, modified in place.
    """
    add_node(
        cfg,
        "MODEL.PFE",
        {
            # Training stage (§V-B): 1 = main branch only, L_ID of Eq. 6 on F_S; 2 = side
            # branches s = 2..4 with MFA (§IV-B) and the losses of Eq. 7-9. Stage 1 builds no
            # side branch and its eval feature is F_5 alone.
            "STAGE": 1,
            # Stage II freezes the main branch (backbone, TSAM, F_5's BN and FC), including
            # BatchNorm running statistics (§V-B "keeping the parameters in main branch
            # fixed"). False = joint training, with L_ID kept in the total (Eq. 9).
            "FREEZE_MAIN": True,
            # TSAM (§IV-C, Eq. 14, Fig. 6): attention inside a "PFETSAM" stage module.
            # "tsam" = FAB then SEB; "fab" / "seb" = one block alone (Table I).
            "TSAM_MODE": "tsam",
            # Reduction ratio r of SEB and of FAB's 1x1-conv bottleneck (Fig. 6, r = 16).
            "TSAM_REDUCTION": 16,
            # Initial bias of the last FAB/SEB layer before the sigmoid. 0 = plain init; about
            # +3 starts the masks near 1 (not in the paper; docs/decisions/pfe.md#tsam-init).
            "TSAM_INIT_BIAS": 0.0,
            # Channel width C of T_s = CONV1x1(X_s) in every side branch (§IV-B, not given
            # in the paper: 128, 96 reproduces Table V's 25.5 M / 9.9 G;
            # docs/decisions/pfe.md#side-width).
            "SIDE_CHANNELS": 128,
            # Dimension of the side features F_s (§V-B: "unify ... to 512").
            "SIDE_DIM": 512,
            # CONV of Eq. 11 with a depthwise-separable 3x3 (Table V's MFA-dagger) instead
            # of a full 3x3.
            "SIDE_SEPARABLE": False,
            # Feature propagation Psi (Eq. 10, 13; Table II): "mfa" = masked (Eq. 13),
            # "fa" = no mask (M_s = 1), "none" = "+side": F_s from T_s alone (no Psi).
            "PROPAGATION": "mfa",
            # alpha of Eq. 12: the top ceil(alpha * H_s * W_s) positions of A_s are masked
            # (static k; §V-B alpha = 0.05).
            "ALPHA": 0.05,
            # Side-branch loss (Fig. 2, Table III): "cascade" = Eq. 7, CE(FC_s([F_s, ...,
            # F_5]) / t_s) with only F_s trained; "independent" = CE(FC_s(F_s)) per side;
            # "uniform" = one CE on FC([F_2, ..., F_5]).
            "SIDE_LOSS": "cascade",
            # Temperatures t_s of Eq. 7 for s = 2, 3, 4 (§V-B: 10, 8, 6; MSMT17 5, 4, 3).
            "TEMPERATURES": [10.0, 8.0, 6.0],
            # w_ro of Eq. 9 for the region-overlap loss L_ro of Eq. 8 (§V-B: 0.001; 0 = off,
            # as in Tables II and III).
            "RO_WEIGHT": 0.001,
            # Pixel reduction of L_ro (Eq. 8): "sum" = the L1 norm of the product map over
            # A_2's H x W positions, as the text writes it ("| . |_1 computes the L-1 norm");
            # "mean" = that sum / (H_2 * W_2), independent of the input size. Either way
            # averaged over the batch. README "Region-overlap loss: sum or mean".
            "RO_REDUCTION": "sum",
            # Stage II evaluation also ranks F_5 alone ("F5/" metrics, stage I's feature) and
            # [F_2, F_3, F_4] alone ("side/" metrics) next to the test feature [F_2..F_5]
            # (unprefixed metrics). False ranks the test feature only.
            "EVAL_GROUPS": True,
            # Test feature [F_2, F_3, F_4, F_5] (Eq. 5) taken "after" the BN before each
            # classifier (docs/decisions/pfe.md#test-feature) or "before" it.
            "TEST_FEAT": "after",
        },
    )
