"""PMM's explanatory maps: the Grad-CAM of every stage at test time (Fig. 4)."""

import torch

from reidzoo.visualize.overlay import MAP_REGISTRY, MapPanel, MapProducer

from .meta_arch import PMM
from .modules import grad_cam

STAGE_NAMES = ("I", "II", "III")


def stage_grad_cams(model, images, targets=None):
    """Grad-CAM of each stage's classifier without any mixing (Fig. 4: "gradients are
    back-propagated from the predicted class").

    Stage I pools GAP(x), stages II and III GMP(x_part), as the eval path does; each stage's
    CAM is taken w.r.t. the map it pools, through its head only (:func:`grad_cam`).

    Args:
        model (PMM): with classifiers (``MODEL.HEADS.NUM_CLASSES`` > 0).
        images (Tensor): [N, 3, H, W] float 0-255.
        targets (Tensor | None): [N] classes to explain; None: each stage's predicted class.
    Returns:
        tuple[list[Tensor], list[Tensor]]: per stage the CAM [N, h, w] and the explained
        classes [N].
    Raises:
        ValueError: the model has no classifiers.
    """
    heads = model.heads
    if len(heads.classifiers) != model.num_stages:
        raise ValueError(
            "PMM Grad-CAM needs the stage classifiers: set MODEL.HEADS.NUM_CLASSES to the "
            "number of training identities (the checkpoint's classifier size), got none"
        )
    with torch.no_grad():
        x, xp = model.trunk(model.preprocess_image(images))
    cams, classes = [], []
    with torch.enable_grad():
        for k in range(model.num_stages):
            fmap = x if k == 0 else xp
            pooled = fmap.mean(dim=(2, 3)) if k == 0 else fmap.amax(dim=(2, 3))
            pooled = pooled.detach().float().requires_grad_()
            logits = heads.classifiers[k](heads.reductions[k](pooled))
            target = logits.argmax(dim=1) if targets is None else targets.to(logits.device)
            cams.append(grad_cam(logits, target, pooled, fmap.float(), retain_graph=False))
            classes.append(target.detach())
    return cams, classes


@MAP_REGISTRY.register()
class PMMMaps(MapProducer):
    """PMM (Fig. 4): ``gradcam``, one panel per stage (I, II, III; BDB's layout has two), each
    for that stage's predicted identity."""

    TAG = "pmm"
    MODULE_TYPES = (PMM,)

    def produce(self, images):
        cams, classes = stage_grad_cams(self.model, images)
        return [
            {
                "gradcam": [
                    MapPanel(f"stage {STAGE_NAMES[k]} id {int(classes[k][i])}", cams[k][i])
                    for k in range(len(cams))
                ]
            }
            for i in range(images.shape[0])
        ]
