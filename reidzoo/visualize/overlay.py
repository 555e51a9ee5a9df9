"""Explanatory maps over the input image: colouring, registration, drawing and the producers.

A *map producer* (a :class:`MapProducer` subclass registered in :data:`MAP_REGISTRY`) turns a
batch of images into named kinds of maps, each a list of :class:`MapPanel` holding a
[h, w] map in the model's own geometry (a feature map's rows and columns). This module
registers every panel with the image the model saw: the map covers the whole network input
(the image resized to ``INPUT.SIZE_TEST``), so it is upsampled to that input's size with the
half-pixel convention (cell ``i`` of ``h`` spans input rows ``[i H / h, (i + 1) H / h)``),
colour-mapped and alpha-blended onto it. Markers and horizontal lines are given as fractions
of the input's height and width, so they land on the same pixels at any display scale.
"""

import dataclasses
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F

from reidzoo.registry import Registry

logger = logging.getLogger(__name__)

INTERPOLATIONS = ("bilinear", "nearest")


class _MapRegistry(Registry):
    """A :class:`Registry` that lists its entries (for producer matching) and, before any
    look-up, imports the modules packages declared with :func:`reidzoo.plugins.declare_maps`
    (lazy registration: the model code does not import this layer)."""

    def _load_declared(self):
        from reidzoo.plugins import load_map_modules

        load_map_modules()

    def get(self, name):
        self._load_declared()
        if name not in self._obj_map:
            raise KeyError(
                f"no map producer named '{name}'; registered producers: "
                f"{', '.join(self._obj_map) or '(none)'}"
            )
        return self._obj_map[name]

    def names(self):
        """Returns:
        list[str]: registered names, in registration order."""
        self._load_declared()
        return list(self._obj_map)

    def items(self):
        """Returns:
        list[tuple[str, type]]: (name, producer class), in registration order."""
        self._load_declared()
        return list(self._obj_map.items())


MAP_REGISTRY = _MapRegistry("MAP_PRODUCER")
MAP_REGISTRY.__doc__ = """
Registry of explanatory-map producers (:class:`MapProducer` subclasses), keyed by class name.

A producer registers with ``@MAP_REGISTRY.register()`` in a module of its own; a package
declares that module with ``reidzoo.plugins.declare_maps("my_pkg.maps")`` when it is imported
(every paper package does), and the registry imports the declared modules at its first
look-up, so importing the model code never imports this layer. A third party can also
register from any module it imports (``REIDZOO.CUSTOM_IMPORTS`` or an entry point). A
producer says which models it explains with :meth:`MapProducer.matches` (by default: the model
contains a module of one of its ``MODULE_TYPES``, e.g. a meta-architecture class or a
backbone part such as IANet's IA block).
"""


@dataclasses.dataclass
class MapPanel:
    """One map to overlay on the input image.

    Attributes:
        title (str): caption.
        values (Tensor): [h, w] float map in the model's geometry (any range; min-max
            normalised when drawn).
        markers (tuple[tuple[float, float], ...]): points (y, x) as fractions of the input
            height and width in [0, 1] (e.g. the position whose receptive field is shown).
        rows (tuple[float, ...]): horizontal lines at these fractions of the input height
            (e.g. stripe boundaries).
        interpolation (str): "bilinear" for continuous maps, "nearest" for masks and counts
            (every map cell becomes a visible block of pixels).
    """

    title: str
    values: torch.Tensor
    markers: tuple = ()
    rows: tuple = ()
    interpolation: str = "bilinear"

    def __post_init__(self):
        values = torch.as_tensor(self.values)
        if values.dim() != 2:
            raise ValueError(
                f"MapPanel '{self.title}': values must be a [h, w] map, got shape "
                f"{tuple(values.shape)}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"MapPanel '{self.title}': interpolation={self.interpolation!r}; expected one "
                f"of {INTERPOLATIONS}"
            )
        self.values = values.detach().float().cpu()
        self.markers = tuple((float(y), float(x)) for y, x in self.markers)
        self.rows = tuple(float(r) for r in self.rows)


class MapProducer:
    """Base class of the explanatory-map producers.

    Subclasses set ``TAG`` (a short lower-case name used in file names) and ``MODULE_TYPES``
    (or override :meth:`matches`), and implement :meth:`produce`.

    Args:
        model (nn.Module): the eval model built from ``cfg``.
        cfg (CfgNode): its config.
        options (dict | None): producer options from the command line, e.g. ``positions``
            (list of (y, x) fractions, IANet) or ``channels`` (list of int, IANet); a producer
            ignores the options it does not use.
    """

    #: short lower-case name of the producer, used in output file names.
    TAG = ""
    #: module classes whose presence in a model selects this producer.
    MODULE_TYPES = ()

    def __init__(self, model, cfg, options=None):
        self.model = model
        self.cfg = cfg
        self.options = dict(options or {})

    @classmethod
    def matches(cls, model, cfg):
        """Whether this producer explains ``model``.

        Args:
            model (nn.Module)
            cfg (CfgNode)
        Returns:
            bool: True when the model contains a module of one of ``MODULE_TYPES``.
        """
        types = tuple(cls.MODULE_TYPES)
        return bool(types) and any(isinstance(m, types) for m in model.modules())

    def produce(self, images):
        """Compute the maps of a batch.

        Args:
            images (Tensor): [N, 3, H, W] float 0-255 at ``INPUT.SIZE_TEST`` (the model's test
                input; the model normalises it).
        Returns:
            list[dict[str, list[MapPanel]]]: per image, map kind -> panels (kinds in order).
        """
        raise NotImplementedError

    def __call__(self, images):
        return self.produce(images)


def select_producers(model, cfg, names=None):
    """The registered producers that explain ``model``.

    Args:
        model (nn.Module)
        cfg (CfgNode)
        names (Sequence[str] | None): registered names to use; None picks every producer whose
            :meth:`MapProducer.matches` is True.
    Returns:
        list[type]: producer classes, in registration order (or the order of ``names``).
    Raises:
        KeyError: a name is not registered (the message lists the registered ones).
        ValueError: no producer matches the model.
    """
    if names:
        return [MAP_REGISTRY.get(n) for n in names]
    found = [cls for _, cls in MAP_REGISTRY.items() if cls.matches(model, cfg)]
    if not found:
        raise ValueError(
            f"no explanatory-map producer matches MODEL.META_ARCHITECTURE="
            f"{cfg.MODEL.META_ARCHITECTURE!r} / MODEL.BACKBONE.NAME={cfg.MODEL.BACKBONE.NAME!r}"
            f"; registered producers: {MAP_REGISTRY.names() or '(none)'} (import the paper "
            "package, e.g. with REIDZOO.CUSTOM_IMPORTS, or register one in "
            "reidzoo.visualize.overlay.MAP_REGISTRY)"
        )
    return found


# ---------------------------------------------------------------------------- map geometry


def normalize_map(values):
    """Min-max normalise a map to [0, 1] (a constant map gives zeros).

    Args:
        values (Tensor | ndarray): [h, w].
    Returns:
        Tensor: [h, w] float32 in [0, 1].
    """
    m = torch.as_tensor(values).detach().float().cpu()
    lo, hi = m.min(), m.max()
    if not torch.isfinite(lo) or not torch.isfinite(hi):
        raise ValueError("cannot draw a map with non-finite values")
    span = hi - lo
    return (m - lo) / span if span > 0 else torch.zeros_like(m)


def upsample_map(values, size, interpolation="bilinear"):
    """Resize a [h, w] map so that it covers an image of ``size`` = (H, W) exactly.

    "bilinear" uses the half-pixel convention (``align_corners=False``): cell centres land at
    input pixel ``(i + 0.5) H / h - 0.5``, the geometry of a strided feature map over its
    input. "nearest" uses the same convention (a pixel takes the cell that holds its centre):
    cell ``i`` covers rows ``ceil(i H / h - 0.5) .. ceil((i + 1) H / h - 0.5) - 1``, exactly
    rows ``[i H / h, (i + 1) H / h)`` when ``h`` divides ``H``.

    Args:
        values (Tensor | ndarray): [h, w].
        size (Sequence[int]): (H, W).
        interpolation (str): "bilinear" or "nearest".
    Returns:
        Tensor: [H, W] float32.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation={interpolation!r}; expected one of {INTERPOLATIONS}")
    m = torch.as_tensor(values).detach().float().cpu()[None, None]
    size = (int(size[0]), int(size[1]))
    if interpolation == "nearest":
        out = F.interpolate(m, size=size, mode="nearest-exact")
    else:
        out = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    return out[0, 0]


def colorize(values, cmap="jet"):
    """Colour a map with a matplotlib colormap (no figure and no GUI backend are involved).

    Args:
        values (Tensor | ndarray): [H, W] in [0, 1] (clipped).
        cmap (str): a matplotlib colormap name.
    Returns:
        ndarray: [H, W, 3] uint8 RGB.
    """
    import matplotlib

    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError as e:
        raise ValueError(f"unknown matplotlib colormap {cmap!r}") from e
    v = np.clip(np.asarray(torch.as_tensor(values).float().cpu()), 0.0, 1.0)
    return (colormap(v)[..., :3] * 255.0 + 0.5).astype(np.uint8)


def to_uint8_image(image):
    """A model input image as a displayable array.

    Args:
        image (Tensor | ndarray): [3, H, W] float 0-255 (a model input) or [H, W, 3].
    Returns:
        ndarray: [H, W, 3] uint8 RGB.
    """
    a = torch.as_tensor(image).detach().float().cpu()
    if a.dim() != 3:
        raise ValueError(f"expected an image [3, H, W] or [H, W, 3], got {tuple(a.shape)}")
    if a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.permute(1, 2, 0)
    return a.round().clamp(0, 255).to(torch.uint8).numpy()


def scale_image(image, scale):
    """Enlarge an image by an integer factor, each pixel becoming a ``scale`` x ``scale``
    block (the geometry is unchanged).

    Args:
        image (ndarray): [H, W, 3] uint8.
        scale (int): >= 1.
    Returns:
        ndarray: [H * scale, W * scale, 3] uint8.
    """
    scale = int(scale)
    if scale < 1:
        raise ValueError(f"display scale must be an integer >= 1, got {scale}")
    if scale == 1:
        return image
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def overlay_map(image, values, alpha=0.5, cmap="jet", interpolation="bilinear"):
    """Blend a colour-mapped map onto the image it was computed from.

    Args:
        image (ndarray): [H, W, 3] uint8, the network input (possibly enlarged by
            :func:`scale_image`).
        values (Tensor | ndarray): [h, w] map covering the whole input.
        alpha (float): weight of the map in [0, 1].
        cmap (str): matplotlib colormap.
        interpolation (str): see :func:`upsample_map`.
    Returns:
        ndarray: [H, W, 3] uint8, ``(1 - alpha) image + alpha colour(map)``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay alpha must be in [0, 1], got {alpha}")
    height, width = image.shape[:2]
    heat = colorize(upsample_map(normalize_map(values), (height, width), interpolation), cmap)
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * heat.astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def marker_pixel(marker, size):
    """Pixel (row, column) of a marker given as fractions of the image height and width.

    Args:
        marker (tuple[float, float]): (y, x) in [0, 1].
        size (Sequence[int]): (H, W).
    Returns:
        tuple[int, int]
    """
    height, width = int(size[0]), int(size[1])
    row = min(max(int(marker[0] * height), 0), height - 1)
    col = min(max(int(marker[1] * width), 0), width - 1)
    return row, col


def draw_markers(image, markers, radius=None, color=(255, 255, 255), outline=(0, 0, 0)):
    """Draw a cross at each marker.

    Args:
        image (ndarray): [H, W, 3] uint8.
        markers (Iterable[tuple[float, float]]): (y, x) fractions of the height and width.
        radius (int | None): half-length of the cross arms; default ~4% of the width, >= 2.
        color, outline (tuple[int, int, int]): RGB of the cross and its dark border.
    Returns:
        ndarray: a new [H, W, 3] uint8 array.
    """
    from PIL import Image, ImageDraw

    height, width = image.shape[:2]
    r = max(2, int(round(0.04 * width))) if radius is None else int(radius)
    pil = Image.fromarray(image)
    draw = ImageDraw.Draw(pil)
    for marker in markers:
        y, x = marker_pixel(marker, (height, width))
        for col, w in ((outline, 3), (color, 1)):
            draw.line([(x - r, y), (x + r, y)], fill=col, width=w)
            draw.line([(x, y - r), (x, y + r)], fill=col, width=w)
    return np.asarray(pil).copy()


def draw_rows(image, rows, color=(255, 255, 255)):
    """Draw full-width horizontal lines at fractions of the image height; a line at ``r``
    lies on pixel row ``ceil(r H - 0.5)``, the first row of the lower stripe as
    :func:`upsample_map` paints it.

    Args:
        image (ndarray): [H, W, 3] uint8.
        rows (Iterable[float]): fractions in [0, 1].
        color (tuple[int, int, int]): RGB.
    Returns:
        ndarray: a new [H, W, 3] uint8 array.
    """
    out = image.copy()
    height = out.shape[0]
    for r in rows:
        y = min(max(math.ceil(float(r) * height - 0.5), 0), height - 1)
        out[y] = color
    return out


def render_panel(image, panel, alpha=0.5, cmap="jet", scale=1):
    """Overlay one panel on the network input, with its markers and lines.

    Args:
        image (Tensor | ndarray): the network input, [3, H, W] float 0-255 or [H, W, 3].
        panel (MapPanel)
        alpha (float): map weight.
        cmap (str): matplotlib colormap.
        scale (int): integer display enlargement.
    Returns:
        ndarray: [H * scale, W * scale, 3] uint8.
    """
    base = scale_image(to_uint8_image(image), scale)
    out = overlay_map(base, panel.values, alpha, cmap, panel.interpolation)
    if panel.rows:
        out = draw_rows(out, panel.rows)
    if panel.markers:
        out = draw_markers(out, panel.markers)
    return out


def render_kind(image, panels, alpha=0.5, cmap="jet", scale=1):
    """The tiles of one map kind: the input (with every panel's markers), then each overlay.

    Args:
        image (Tensor | ndarray): the network input, [3, H, W] float 0-255 or [H, W, 3].
        panels (list[MapPanel])
        alpha, cmap, scale: see :func:`render_panel`.
    Returns:
        list[tuple[str, ndarray]]: (title, [H * scale, W * scale, 3] uint8) tiles.
    """
    base = scale_image(to_uint8_image(image), scale)
    markers = [m for p in panels for m in p.markers]
    tiles = [("input", draw_markers(base, markers) if markers else base)]
    tiles += [(p.title, render_panel(image, p, alpha, cmap, scale)) for p in panels]
    return tiles


# ------------------------------------------------------------------------------- figures


def compose_tiles(tiles, columns=None, caption_height=14, pad=4):
    """Lay captioned tiles out on a grid with :mod:`reidzoo.visualize.common`'s helpers.

    Tiles are centred on white boxes as wide as the widest caption needs (so that short
    panels keep readable captions), captioned underneath and laid out row by row.

    Args:
        tiles (list[tuple[str, ndarray]]): (caption, [h, w, 3] uint8) pairs of one size.
        columns (int | None): tiles per row; None puts all of them in one row.
        caption_height (int): caption strip height in pixels.
        pad (int): margin and spacing.
    Returns:
        PIL.Image.Image: RGB.
    """
    from PIL import Image, ImageDraw

    from reidzoo.visualize.common import BACKGROUND, add_caption, compose_grid, get_font

    if not tiles:
        raise ValueError("compose_tiles needs at least one tile")
    font = get_font(max(8, caption_height - 5))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    height = max(t.shape[0] for _, t in tiles)
    width = max(t.shape[1] for _, t in tiles)
    width = max(width, *(int(probe.textlength(title, font=font)) + 4 for title, _ in tiles))
    cells = []
    for title, tile in tiles:
        box = Image.new("RGB", (width, height), BACKGROUND)
        box.paste(Image.fromarray(tile), ((width - tile.shape[1]) // 2, 0))
        cells.append(add_caption(box, title, caption_height, font))
    return compose_grid(cells, len(cells) if columns is None else columns, pad=pad)


# ------------------------------------------------------------------ helpers for producers


def cell_center(index, size):
    """Centre of cell ``index`` of ``size`` cells, as a fraction of the covered extent.

    Args:
        index (int): 0-based cell.
        size (int): cells along that axis.
    Returns:
        float: ``(index + 0.5) / size``.
    """
    return (int(index) + 0.5) / int(size)


def position_cell(fraction, size):
    """The cell of a ``size``-cell axis that contains a point at ``fraction`` of the extent.

    Args:
        fraction (float): in [0, 1] (1 maps to the last cell).
        size (int): cells along that axis.
    Returns:
        int
    """
    return min(max(int(float(fraction) * int(size)), 0), int(size) - 1)
