"""Building a model for inference (export, complexity, feature extraction) from a config."""

import logging

from reidzoo import config as _config  # noqa: F401  (the core's config hooks)

logger = logging.getLogger(__name__)


def build_model(cfg):
    """Build ``cfg``'s model the way reidzoo's trainer and tools do: fast-reid's
    ``build_model`` after reidzoo's own checks, with out-of-place normalisation for
    fast-reid's ``Baseline``/``MGN``.

    * every component ``cfg`` names is registered, or an untried ``reidzoo.plugins`` entry point
      provides it (:func:`reidzoo.plugins.resolve_components`);
    * ``MODEL.BACKBONE.PRETRAIN`` without ``PRETRAIN_PATH`` on one of fast-reid's backbones is an
      error (fast-reid would try to download ImageNet weights);
    * a ``Baseline``/``MGN`` model normalises out of place
      (:func:`reidzoo.modeling.meta_arch.normalize_out_of_place`: that instance only).

    Args:
        cfg (CfgNode): a full reidzoo config.
    Returns:
        nn.Module: on ``cfg.MODEL.DEVICE``, in training mode.
    Raises:
        KeyError: a component name nothing provides (see ``resolve_components``).
        FileNotFoundError: ``PRETRAIN`` True and ``PRETRAIN_PATH`` empty on a fast-reid backbone.
    """
    from fastreid.modeling.meta_arch import build_model as fastreid_build_model

    from reidzoo.modeling.meta_arch import normalize_out_of_place
    from reidzoo.plugins import resolve_components
    from reidzoo.registry import BACKBONE_REGISTRY

    resolve_components(cfg)
    bb = cfg.MODEL.BACKBONE
    builder = BACKBONE_REGISTRY._obj_map.get(bb.NAME)
    if bb.PRETRAIN and not bb.PRETRAIN_PATH and builder.__module__.startswith("fastreid."):
        raise FileNotFoundError(
            f"MODEL.BACKBONE.PRETRAIN is True but MODEL.BACKBONE.PRETRAIN_PATH is empty, and "
            f"fast-reid's {bb.NAME} would download ImageNet weights: nothing is downloaded at "
            f"run time. Set MODEL.BACKBONE.PRETRAIN_PATH to a local torchvision-style "
            f"checkpoint, or MODEL.BACKBONE.PRETRAIN False."
        )
    return normalize_out_of_place(fastreid_build_model(cfg))


def build_eval_model(cfg, load_weights=True):
    """Build the model described by ``cfg``, load ``MODEL.WEIGHTS`` and put it in eval mode.

    ``REIDZOO.CUSTOM_IMPORTS`` are imported first; the model is built by :func:`build_model`
    (a component name that nothing imported provides is looked up in the ``reidzoo.plugins``
    entry points). ``MODEL.WEIGHTS`` is
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
    from reidzoo.checkpoint import load_for_inference
    from reidzoo.plugins import import_modules

    reidzoo_node = cfg.get("REIDZOO", None)
    if reidzoo_node is not None:
        import_modules(reidzoo_node.get("CUSTOM_IMPORTS", []) or [])
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
