"""Building a model for inference (export, complexity, feature extraction) from a config."""

import logging

from reidzoo import config as _config  # noqa: F401  (the core's config hooks)

logger = logging.getLogger(__name__)


def build_eval_model(cfg, load_weights=True):
    """Build the model described by ``cfg``, load ``MODEL.WEIGHTS`` and put it in eval mode.

    ``REIDZOO.CUSTOM_IMPORTS`` are imported first, and a component name that nothing imported
    provides is looked up in the ``reidzoo.plugins`` entry points
    (:func:`reidzoo.plugins.resolve_components`). ``MODEL.WEIGHTS`` is
    loaded by :func:`reidzoo.checkpoint.load_for_inference`, the rule of every inference tool:
    read weights-only, no ImageNet initialisation, the classifier sized from the checkpoint
    (a config's ``MODEL.HEADS.NUM_CLASSES 0`` is not a mismatch), any other misfit an error.

    Args:
        cfg (CfgNode): a full reidzoo config (frozen or not; it is not modified).
        load_weights (bool): load ``MODEL.WEIGHTS`` (if set). False builds the model with its
            initial weights and no warning, for tools that never look at weight values.
    Returns:
        nn.Module: fastreid's model on ``cfg.MODEL.DEVICE`` in eval mode; its forward takes
        images [N, 3, H, W] (float, 0-255) or ``{"images": ...}`` and returns features [N, D].
    Raises:
        FileNotFoundError: ``MODEL.WEIGHTS`` names a file that does not exist.
        reidzoo.checkpoint.CheckpointMismatchError: the checkpoint does not fit the model and
            ``REIDZOO.STRICT_LOAD`` is True.
        reidzoo.checkpoint.UnsafeCheckpointError: the file needs Python objects outside the
            weights-only allow-list (and ``REIDZOO.WEIGHTS_ONLY`` is True).
    """
    from fastreid.modeling.meta_arch import build_model

    from reidzoo.checkpoint import load_for_inference
    from reidzoo.plugins import import_modules, resolve_components

    reidzoo_node = cfg.get("REIDZOO", None)
    if reidzoo_node is not None:
        import_modules(reidzoo_node.get("CUSTOM_IMPORTS", []) or [])
    resolve_components(cfg)
    weights = cfg.MODEL.WEIGHTS if load_weights else ""
    if weights:
        model, _ = load_for_inference(cfg, build_model)
        logger.info("loaded weights from %s", weights)
        return model.eval()
    model = build_model(cfg)
    if load_weights:
        logger.warning(
            "MODEL.WEIGHTS is empty: the model has random (or ImageNet-initialised) weights; "
            "its outputs are meaningless for re-identification"
        )
    return model.eval()
