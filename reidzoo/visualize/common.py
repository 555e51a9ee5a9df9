"""Image helpers shared by the visualisation tools: cells, borders, captions, grids, PNG files.

A figure is built from *cells*: an image fitted into a fixed box (:func:`fit_image`), framed by
a coloured border (:func:`add_border`) and given a caption strip under it
(:func:`add_caption`); :func:`make_cell` does all three. Cells of one size are laid out by
:func:`compose_grid`, a title strip goes on top with :func:`add_title`, and :func:`save_png`
writes the result atomically. Every size is in pixels and follows from the arguments, so a
caller (or a test) can tell the size of a figure from its layout:

* a cell is ``(w + 2 * border, h + 2 * border + caption_height)`` for an image box ``(h, w)``;
* a grid of ``c`` columns and ``r`` rows of cells ``(cw, ch)`` is
  ``(2 * pad + c * cw + sum(col_gaps), 2 * pad + r * ch + (r - 1) * pad)``, where
  ``col_gaps`` defaults to ``pad`` between columns;
* a title adds ``title_height`` rows at the top.
"""

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: RGB colours: a correct match, a wrong one, the query, text, background.
CORRECT = (0, 170, 0)
WRONG = (220, 0, 0)
QUERY = (40, 90, 220)
TEXT = (20, 20, 20)
BACKGROUND = (255, 255, 255)


def get_font(size=11):
    """Pillow's built-in font at ``size`` pixels (a bitmap font when FreeType is missing).

    Args:
        size (int): font size in pixels.
    Returns:
        PIL.ImageFont.ImageFont | PIL.ImageFont.FreeTypeFont
    """
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def load_image(source):
    """An RGB image to display, from a file or an in-memory image.

    Files are read with fast-reid's ``read_image`` (an unreadable file raises an error naming
    it), as the data loaders read them.

    Args:
        source (str | os.PathLike | PIL.Image.Image | np.ndarray): a path, a PIL image, or an
            ``[H, W(, C)]`` uint8 array.
    Returns:
        PIL.Image.Image: mode "RGB".
    """
    from reidzoo.inference import to_pil

    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "image"
    return to_pil(source, name)


def fit_image(image, size, background=BACKGROUND):
    """Resize ``image`` to fit a ``size`` box, keeping its aspect ratio, centred on a
    ``background`` canvas.

    Args:
        image (PIL.Image.Image)
        size (tuple[int, int]): box (h, w).
        background (tuple[int, int, int]): RGB fill around the image.
    Returns:
        PIL.Image.Image: RGB, exactly ``w x h``.
    """
    h, w = int(size[0]), int(size[1])
    image = image.convert("RGB")
    scale = min(w / image.width, h / image.height)
    new = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resized = image.resize(new, Image.BILINEAR)
    canvas = Image.new("RGB", (w, h), background)
    canvas.paste(resized, ((w - new[0]) // 2, (h - new[1]) // 2))
    return canvas


def add_border(image, color, width):
    """Frame ``image`` with a solid border.

    Args:
        image (PIL.Image.Image)
        color (tuple[int, int, int]): RGB.
        width (int): border width in pixels (0: none).
    Returns:
        PIL.Image.Image: ``(W + 2 * width) x (H + 2 * width)``.
    """
    canvas = Image.new("RGB", (image.width + 2 * width, image.height + 2 * width), color)
    canvas.paste(image, (width, width))
    return canvas


def _draw_centred(draw, box, text, font, fill):
    """Draw ``text`` centred in ``box`` (x0, y0, x1, y1), cut with "..." to fit its width."""
    x0, y0, x1, y1 = box
    text = str(text)
    while text and draw.textlength(text, font=font) > (x1 - x0) and len(text) > 3:
        text = text[:-4] + "..."
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = x0 + ((x1 - x0) - (right - left)) / 2 - left
    y = y0 + ((y1 - y0) - (bottom - top)) / 2 - top
    draw.text((x, y), text, font=font, fill=fill)


def add_caption(image, text, height, font=None, color=TEXT, background=BACKGROUND):
    """Add a caption strip under ``image``.

    Args:
        image (PIL.Image.Image)
        text (str): one line, centred; cut with "..." when wider than the image.
        height (int): strip height in pixels (0: no caption).
        font: a PIL font; None: :func:`get_font` sized to the strip.
        color (tuple[int, int, int]): text colour.
        background (tuple[int, int, int]): strip colour.
    Returns:
        PIL.Image.Image: ``W x (H + height)``.
    """
    canvas = Image.new("RGB", (image.width, image.height + height), background)
    canvas.paste(image, (0, 0))
    if height > 0 and text:
        font = font or get_font(max(8, height - 5))
        box = (0, image.height, image.width, image.height + height)
        _draw_centred(ImageDraw.Draw(canvas), box, text, font, color)
    return canvas


def make_cell(source, size, border_color, border=4, caption="", caption_height=16, font=None):
    """One figure cell: an image fitted into ``size``, framed and captioned.

    Args:
        source: a path or image for :func:`load_image`.
        size (tuple[int, int]): image box (h, w).
        border_color (tuple[int, int, int]): RGB of the frame.
        border (int): frame width.
        caption (str): text under the frame.
        caption_height (int): caption strip height (0: none).
        font: PIL font for the caption (None: default).
    Returns:
        PIL.Image.Image: ``(w + 2 * border) x (h + 2 * border + caption_height)``.
    """
    image = fit_image(load_image(source), size)
    return add_caption(add_border(image, border_color, border), caption, caption_height, font)


def compose_grid(cells, ncols, pad=4, col_gaps=None, background=BACKGROUND):
    """Lay out cells of one size in rows of ``ncols``, with a ``pad`` margin and spacing.

    Args:
        cells (Sequence[PIL.Image.Image]): all the same size; filled row by row.
        ncols (int): columns.
        pad (int): outer margin and spacing between rows (and columns by default).
        col_gaps (Sequence[int] | None): ``ncols - 1`` gaps between consecutive columns;
            None: ``pad`` each.
        background (tuple[int, int, int]): canvas colour.
    Returns:
        PIL.Image.Image: see the module docstring for its size.
    Raises:
        ValueError: no cells, cells of different sizes, or a wrong number of gaps.
    """
    if not cells:
        raise ValueError("compose_grid needs at least one cell")
    cw, ch = cells[0].size
    odd = {c.size for c in cells if c.size != (cw, ch)}
    if odd:
        raise ValueError(f"cells must share one size, got {(cw, ch)} and {sorted(odd)}")
    ncols = max(1, min(int(ncols), len(cells)))
    gaps = [pad] * (ncols - 1) if col_gaps is None else [int(g) for g in col_gaps]
    if len(gaps) != ncols - 1:
        raise ValueError(f"{ncols} columns need {ncols - 1} col_gaps, got {len(gaps)}")
    nrows = -(-len(cells) // ncols)
    xs = [pad + i * cw + sum(gaps[:i]) for i in range(ncols)]
    width = 2 * pad + ncols * cw + sum(gaps)
    height = 2 * pad + nrows * ch + (nrows - 1) * pad
    canvas = Image.new("RGB", (width, height), background)
    for i, cell in enumerate(cells):
        r, c = divmod(i, ncols)
        canvas.paste(cell, (xs[c], pad + r * (ch + pad)))
    return canvas


def add_title(image, text, height=18, font=None, color=TEXT, background=BACKGROUND):
    """Add a title strip on top of ``image``.

    Args:
        image (PIL.Image.Image)
        text (str): one line, centred (cut with "..." when too wide).
        height (int): strip height (0: no title).
        font: PIL font; None: :func:`get_font` sized to the strip.
        color (tuple[int, int, int]): text colour.
        background (tuple[int, int, int]): strip colour.
    Returns:
        PIL.Image.Image: ``W x (H + height)``.
    """
    canvas = Image.new("RGB", (image.width, image.height + height), background)
    canvas.paste(image, (0, height))
    if height > 0 and text:
        font = font or get_font(max(8, height - 6))
        _draw_centred(ImageDraw.Draw(canvas), (2, 0, image.width - 2, height), text, font, color)
    return canvas


def save_png(image, path):
    """Write ``image`` as a PNG through a temporary file and ``os.replace`` (never a partial
    file; an existing one is replaced only by a complete new one).

    Args:
        image (PIL.Image.Image | np.ndarray): an image or an ``[H, W, 3]`` uint8 array.
        path (str): output file; its folder is created.
    Returns:
        str: ``path``.
    """
    from reidzoo.checkpoint import atomic_write

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    atomic_write(path, lambda f: image.save(f, format="PNG"))
    return path
