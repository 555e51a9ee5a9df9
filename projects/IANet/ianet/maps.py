"""IANet's explanatory maps (Fig. 8): SIA receptive fields of chosen positions, CIA channels."""

import torch

from reidzoo.visualize.overlay import (
    MAP_REGISTRY,
    MapPanel,
    MapProducer,
    cell_center,
    position_cell,
)

from .ia import IABlock

#: Fig. 8's five positions (head, torso, belt/bag, legs, shoe) as (y, x) fractions of the
#: input; the paper picks them by hand per image, these suit an upright, centred person.
DEFAULT_POSITIONS = ((0.1, 0.5), (0.35, 0.5), (0.55, 0.5), (0.75, 0.5), (0.95, 0.5))
#: Fig. 8's CIA channels, 0-based: the paper's 5th, 25th and 121st.
DEFAULT_CHANNELS = (4, 24, 120)


def ia_blocks(model):
    """The IA blocks of a model with a short tag each.

    Args:
        model (nn.Module)
    Returns:
        list[tuple[str, IABlock]]: (tag, block); the tag is the module path without
        ``backbone.`` and ``.inserted``, dots replaced by ``_`` (``layer3``, ``layer2_0_1``).
    """
    out = []
    for name, m in model.named_modules():
        if isinstance(m, IABlock):
            tag = name.removeprefix("backbone.").replace(".inserted", "").replace(".", "_")
            out.append((tag or "ia", m))
    return out


def capture_ia_inputs(model, images):
    """Run the model once and record what every SIA module aggregates and what every CIA
    module outputs.

    Args:
        model (nn.Module): eval model with IA blocks; forward takes images float 0-255.
        images (Tensor): [N, 3, H, W] float 0-255.
    Returns:
        dict[str, dict]: block tag -> ``{"block": IABlock, "sia_in": F [N, C, h, w] or None,
        "cia_out": E^C [N, C, h, w] or None}`` (the CIA module's aggregated channels, Eq. 8,
        before its residual BN).
    """
    records, handles = {}, []
    for tag, block in ia_blocks(model):
        rec = records[tag] = {"block": block, "sia_in": None, "cia_out": None}
        if block.sia is not None:
            handles.append(
                block.sia.module.register_forward_hook(
                    lambda mod, inp, out, rec=rec: rec.__setitem__("sia_in", inp[0].detach())
                )
            )
        if block.cia is not None:
            handles.append(
                block.cia.module.register_forward_hook(
                    lambda mod, inp, out, rec=rec: rec.__setitem__("cia_out", out.detach())
                )
            )
    try:
        with torch.no_grad():
            model(images.clone())  # fast-reid's Baseline normalises its input in place
    finally:
        for h in handles:
            h.remove()
    return records


def receptive_fields(sia, x, positions):
    """Rows of SIA's relation map S (Eq. 5, or S^A / S^L per ``RELATION``) for chosen
    positions: how much each position's aggregated feature (Eq. 6) draws from every other
    position, i.e. its receptive field (§4.4).

    Args:
        sia (SIA): the module.
        x (Tensor): its input F, [N, C, h, w].
        positions (Sequence[tuple[float, float]]): (y, x) fractions of the input.
    Returns:
        tuple: fields [N, P, h, w] and the cells [(row, col), ...] of the positions.
    """
    n, _, h, w = x.shape
    with torch.no_grad():
        s = sia.relation_map(x)  # [N, M, M], row i = weights of position i's aggregation
    cells = [(position_cell(py, h), position_cell(px, w)) for py, px in positions]
    rows = torch.tensor([r * w + c for r, c in cells], device=s.device)
    return s[:, rows].reshape(n, len(cells), h, w), cells


@MAP_REGISTRY.register()
class IANetMaps(MapProducer):
    """IANet (Fig. 8): per IA block, the SIA receptive fields of chosen positions
    (``sia_<block>``) and channel maps of CIA's aggregated output (``cia_<block>``).

    Options:
        positions (list[tuple[float, float]]): (y, x) fractions of the input; each is moved
            to the centre of the feature cell that contains it (default
            :data:`DEFAULT_POSITIONS`).
        channels (list[int]): 0-based CIA output channels (default :data:`DEFAULT_CHANNELS`).
    """

    TAG = "ianet"
    MODULE_TYPES = (IABlock,)

    def produce(self, images):
        positions = [tuple(p) for p in (self.options.get("positions") or DEFAULT_POSITIONS)]
        for p in positions:
            if len(p) != 2 or not all(0.0 <= float(v) <= 1.0 for v in p):
                raise ValueError(f"--positions entry {p}: expected y,x fractions in [0, 1]")
        channels = [int(c) for c in (self.options.get("channels") or DEFAULT_CHANNELS)]
        records = capture_ia_inputs(self.model, images)
        out = [{} for _ in range(images.shape[0])]
        for tag, rec in records.items():
            if rec["sia_in"] is not None:
                x = rec["sia_in"]
                fields, cells = receptive_fields(rec["block"].sia.module, x, positions)
                h, w = x.shape[-2:]
                marks = [(cell_center(r, h), cell_center(c, w)) for r, c in cells]
                for i in range(len(out)):
                    out[i][f"sia_{tag}"] = [
                        MapPanel(f"SIA ({r},{c})", fields[i, k], markers=(marks[k],))
                        for k, (r, c) in enumerate(cells)
                    ]
            if rec["cia_out"] is not None:
                e = rec["cia_out"]
                bad = [c for c in channels if not 0 <= c < e.shape[1]]
                if bad:
                    raise ValueError(
                        f"--channels {bad}: the CIA block after {tag} has {e.shape[1]} "
                        f"channels (0-based indices 0..{e.shape[1] - 1})"
                    )
                for i in range(len(out)):
                    out[i][f"cia_{tag}"] = [MapPanel(f"CIA ch {c}", e[i, c]) for c in channels]
        return out
