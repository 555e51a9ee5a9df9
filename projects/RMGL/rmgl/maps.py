"""RMGL's explanatory maps: original vs receptive-partitioned responses (Fig. 4) and the
activation-balanced pooling split (Fig. 5)."""

import torch

from reidzoo.visualize.overlay import MAP_REGISTRY, MapPanel, MapProducer

from .meta_arch import RMGL
from .modules import abp_split_points, channel_peaks, check_partition, receptive_partition


def branch_final_maps(model, x):
    """Final maps of every branch's original path and, for K > 1, its receptive-partitioned
    path (the RP path shares the branch's weights, so it is shown whatever ``PATHS`` says).

    Args:
        model (RMGL)
        x (Tensor): [N, 3, H, W] normalised images, H divisible by 16 K for every K.
    Returns:
        list[dict]: per branch ``k`` (int), ``original`` [N, C, h, w] and ``rp``
        ([N, C, h, w] or None).
    """
    for k in model.granularities:
        check_partition(int(x.shape[2]), k, model.stride)
    trunk = [x]
    for m in model.trunk:  # shared by every branch: run once
        trunk.append(m(trunk[-1]))
    out = []
    for b, k in enumerate(model.granularities):
        mods = model.path_modules(b)
        inter = list(trunk)
        for m in mods[len(model.trunk) :]:
            inter.append(m(inter[-1]))

        def tail(t, mods=mods):
            for m in mods[model.rp_index :]:
                t = m(t)
            return t

        rp = receptive_partition(inter[model.rp_index], tail, k) if k > 1 else None
        out.append({"k": k, "original": inter[-1], "rp": rp})
    return out


def argmax_counts(x, ties="strict"):
    """Number of channels whose spatial maximum is at each position (Eq. 8 summed over c).

    Args:
        x (Tensor): [N, C, h, w].
        ties (str): how a channel whose maximum is tied counts (``MODEL.RMGL.ABP_TIES``):
            "strict" nowhere, "first" at its first maximal position.
    Returns:
        Tensor: [N, h, w] counts (they sum to C with "first", to the number of channels with a
        unique maximum with "strict").
    """
    n, c, h, w = x.shape
    idx, counted = channel_peaks(x, ties)  # [N, C]
    counts = torch.zeros(n, h * w, device=x.device)
    counts.scatter_add_(1, idx, counted.to(counts.dtype))
    return counts.reshape(n, h, w)


@MAP_REGISTRY.register()
class RMGLMaps(MapProducer):
    """RMGL: per branch the response (channel mean) of the last map by the original path
    (``O-K``, with the stripe boundaries the model pools: ABP's when ``ABP_TEST``, else
    uniform) and by the receptive-partitioned path (``RP-K``, with its fixed cuts), as Fig. 4
    (``responses``); and ABP's max-activation histogram, the count of channels peaking at each
    position, with its split rows, as Fig. 5 (``abp``).
    """

    TAG = "rmgl"
    MODULE_TYPES = (RMGL,)

    def produce(self, images):
        model = self.model
        with torch.no_grad():
            branches = branch_final_maps(model, model.preprocess_image(images))
        result = [{"responses": [], "abp": []} for _ in range(images.shape[0])]
        for br in branches:
            k, y = br["k"], br["original"]
            h = y.shape[2]
            uniform = [j / k for j in range(1, k)]
            if k > 1:
                bounds = abp_split_points(y, k, model.abp_ties)[:, 1:-1].float() / h
            counts = argmax_counts(y, model.abp_ties)
            for i, kinds in enumerate(result):
                abp_rows = tuple(bounds[i].tolist()) if k > 1 else ()
                rows = abp_rows if model.abp_test else tuple(uniform)
                kinds["responses"].append(MapPanel(f"O-{k}", y[i].mean(0), rows=rows))
                if br["rp"] is not None:
                    rp = br["rp"][i].mean(0)
                    kinds["responses"].append(MapPanel(f"RP-{k}", rp, rows=tuple(uniform)))
                if k > 1:
                    kinds["abp"].append(
                        MapPanel(f"ABP-{k}", counts[i], rows=abp_rows, interpolation="nearest")
                    )
        for kinds in result:
            if not kinds["abp"]:
                del kinds["abp"]
        return result
