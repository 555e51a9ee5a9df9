"""PAN's explanatory maps: PLM part masks (§3.2) and PAM compatibility maps (Eq. 2, Fig. 5-6)."""

import torch

from reidzoo.visualize.overlay import MAP_REGISTRY, MapPanel, MapProducer

from .heads import PANHead
from .modules import PLM


def part_titles(scales):
    """Captions of the PLM parts, scales in order: ``l1 p1``, ``l2 p1``, ``l2 p2``, ...

    Args:
        scales (Sequence[int]): PLM granularities.
    Returns:
        list[str]
    """
    return [f"l{s} p{j + 1}" for s in scales for j in range(s)]


def pan_stage_maps(model, images):
    """Stage outputs the PAN head sees, computed as the model computes them.

    Args:
        model (nn.Module): a ``PAN`` meta-architecture, or any model with a ``PANHead`` as
            ``heads`` whose backbone returns the layer4 map (e.g. fast-reid's ``Baseline``).
        images (Tensor): [N, 3, H, W] float 0-255.
    Returns:
        dict[str, Tensor]: "layer4" (and every PAM stage for ``PAN``) -> [N, C, h, w].
    """
    x = model.preprocess_image(images.clone())
    feats = model.extract(x) if hasattr(model, "extract") else model.backbone(x)
    return {"layer4": feats} if isinstance(feats, torch.Tensor) else feats


@MAP_REGISTRY.register()
class PANMaps(MapProducer):
    """PAN: the PLM part masks s_j^l on X^4 (``plm``), the compatibility theta(P_1, X^l) of the
    first-scale part against every PAM block (``pam``, Fig. 5) and of every part against each
    block (``pam_<stage>``, Fig. 6 shows the third).
    """

    TAG = "pan"
    MODULE_TYPES = (PANHead,)

    def produce(self, images):
        head = self.model.heads
        with torch.no_grad():
            feats = pan_stage_maps(self.model, images)
            parts, masks = head.parts(feats["layer4"])  # P [N, K, C], masks per scale
            compat = {s: head.pam[s].compatibility(parts, feats[s]) for s in head.pam_stages}
        h4, w4 = feats["layer4"].shape[-2:]
        out = [{} for _ in range(images.shape[0])]
        titles = part_titles(head.parts.scales) if isinstance(head.parts, PLM) else None
        if titles is None:
            titles = [f"stripe {k + 1}" for k in range(parts.shape[1])]
        if masks:
            s = torch.cat(masks, dim=1).reshape(-1, parts.shape[1], h4, w4)
            for i in range(len(out)):
                out[i]["plm"] = [MapPanel(f"PLM {t}", s[i, k]) for k, t in enumerate(titles)]
        if compat:
            for i in range(len(out)):
                out[i]["pam"] = [
                    MapPanel(f"PAM {st} {titles[0]}", c[i, 0].reshape(feats[st].shape[-2:]))
                    for st, c in compat.items()
                ]
            for st, c in compat.items():
                hw = feats[st].shape[-2:]
                for i in range(len(out)):
                    out[i][f"pam_{st}"] = [
                        MapPanel(f"{st} {t}", c[i, k].reshape(hw)) for k, t in enumerate(titles)
                    ]
        return out
