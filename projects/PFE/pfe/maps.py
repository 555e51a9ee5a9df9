"""PFE's explanatory maps: per-layer activation maps A_s (Fig. 5) and the MFA masks M_s."""

import torch

from reidzoo.modeling.backbone import STAGES
from reidzoo.visualize.overlay import MAP_REGISTRY, MapPanel, MapProducer

from .meta_arch import PFE
from .modules import activation_map


@MAP_REGISTRY.register()
class PFEMaps(MapProducer):
    """PFE (Fig. 5): the activation maps of the four used layers and MFA's masks.

    Stage II models give MFA's own A_2..A_5 (channel sums of |T_s|, §IV-B) as
    ``activations`` and the regions Eq. 12 masks out (M_s = 0: the top alpha of A_s, the cues
    layer s captured) as ``masks``. Stage I models have no side branches: ``activations``
    then holds the same statistic of the TSAM-refined stage outputs X_2..X_5.
    """

    TAG = "pfe"
    MODULE_TYPES = (PFE,)

    def produce(self, images):
        model = self.model
        with torch.no_grad():
            x = model.preprocess_image(images)
            if model.stage == 2:
                out = model.features(x)
                acts, masks = out["acts"], [1.0 - m[:, 0] for m in out["masks"]]
                names = [f"A_{s + 2}" for s in range(len(acts))]
            else:
                maps = model.backbone.forward_stages(x, STAGES)
                acts, masks = [activation_map(maps[s]) for s in STAGES], []
                names = [f"X_{s + 2} ({name})" for s, name in enumerate(STAGES)]
        result = []
        for i in range(images.shape[0]):
            kinds = {"activations": [MapPanel(t, a[i]) for t, a in zip(names, acts)]}
            if masks:
                kinds["masks"] = [
                    MapPanel(f"M_{s + 2}=0", m[i], interpolation="nearest")
                    for s, m in enumerate(masks)
                ]
            result.append(kinds)
        return result
