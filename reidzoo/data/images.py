"""One image reader for training, evaluation and feature extraction, and an up-front check.

:func:`read_image` is the only way reidzoo turns a file into pixels: fast-reid's data loaders
reach it through ``reidzoo.compat`` (``fastreid.data.common.read_image``), and
:class:`reidzoo.FeatureExtractor` / ``reidzoo.extract`` call it directly, so a file gives the same
8-bit RGB pixels everywhere. Conversion rules (each mode has one fixed rule, never guessed from
the pixel values):

* ``RGB``: as stored. ``RGBX``, ``CMYK``, ``YCbCr``, ``HSV``: Pillow's conversion to RGB (no
  ICC colour management).
* ``L`` (grayscale) and ``1`` (bilevel, 0 or 255): the value repeated in R, G and B.
* Alpha (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa`` / ``La``, ``P`` with a
  ``transparency`` entry): the alpha channel is dropped and the stored colour kept (premultiplied
  modes are un-premultiplied first). This is what OpenCV's ``imread``, torchreid's ``read_image``
  and Pillow's ``convert("RGB")`` do, so features match other tools; compositing onto a
  background would invent colours where the crop is transparent.
* ``P`` (palette): the palette colour of each pixel.
* ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (16-bit grayscale PNG/TIFF) and ``I`` (Pillow's mode for
  16-bit PGM and 32-bit integer TIFF): read on the 16-bit scale 0..65535 and reduced to its high
  byte (``v >> 8``), as Pillow itself reduces 16-bit RGB PNG/PPM files; an 8-bit value ``v``
  stored as ``257 * v`` reads back as ``v``. Pillow's own ``convert`` clips such images at 255
  (almost all white). An ``I`` value outside 0..65535 is an error.
* ``F`` (32-bit float): the usual float scale 0..1, times 255, rounded; a value outside 0..1 (or
  not finite) is an error.

EXIF orientation is applied as fast-reid's ``read_image`` applies it. The whole file is decoded,
and a truncated file is an error even where ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is set
(Pillow would otherwise fill the missing rows with grey).

:func:`find_unreadable` / :func:`check_images` decode every image of a dataset once, before any
training step, and remember what decoded under ``$REIDZOO_CACHE`` (else ``~/.cache/reidzoo``),
keyed by absolute path, size and ``mtime_ns``, so that a second run does not pay again.
"""

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL
from PIL import Image, ImageFile, ImageOps

logger = logging.getLogger(__name__)

__all__ = [
    "ImageReadError",
    "UnreadableImagesError",
    "cache_dir",
    "check_images",
    "find_unreadable",
    "read_image",
    "to_rgb",
]

#: Bump when a conversion rule changes: cached "this file decodes" results are then re-checked.
READER_VERSION = 1

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageReadError(OSError):
    """A file that cannot be read as an image; ``path`` is absolute, ``reason`` says why."""

    def __init__(self, path, reason):
        self.path = os.path.abspath(os.fspath(path))
        self.reason = reason
        super().__init__(f"cannot read image file '{self.path}': {reason}")


class UnreadableImagesError(OSError):
    """Several images that cannot be read; ``failures`` maps absolute path -> reason."""

    def __init__(self, failures, total, labels=None):
        self.failures = dict(failures)
        labels = labels or {}
        lines = [
            f"  {f'[{labels[p]}] ' if p in labels else ''}{p}: {reason}"
            for p, reason in self.failures.items()
        ]
        super().__init__(
            f"{len(self.failures)} of {total} images cannot be read as images; replace or remove "
            "them (every file was decoded with reidzoo.data.images.read_image, as the data "
            "loaders read them):\n" + "\n".join(lines)
        )


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------
_strict_lock = threading.Lock()
_strict_depth = 0
_strict_saved = False


class _StrictTruncation:
    """Context: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is False while any of our reads runs.

    The flag is a module global that other code may have set; a depth count (not a plain
    save/restore) keeps concurrent reads in threads from restoring it under each other.
    """

    def __enter__(self):
        global _strict_depth, _strict_saved
        with _strict_lock:
            if _strict_depth == 0:
                _strict_saved = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = False
            _strict_depth += 1

    def __exit__(self, *exc):
        global _strict_depth
        with _strict_lock:
            _strict_depth -= 1
            if _strict_depth == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES = _strict_saved
        return False


def _gray_to_rgb(gray):
    return Image.fromarray(np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2)))


def to_rgb(image, name="image"):
    """8-bit RGB from a decoded PIL image of any mode, by the rules in this module's docstring.

    Args:
        image (PIL.Image.Image): any mode.
        name (str): the file name, for error messages.
    Returns:
        PIL.Image.Image: mode "RGB", same size.
    Raises:
        ValueError: an ``I`` or ``F`` image with values outside its scale, or a mode Pillow
            cannot convert to RGB (the message names ``name`` and the mode).
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(image)
        if mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(
                f"{name}: 32-bit integer image (mode I) with values in "
                f"[{values.min()}, {values.max()}]; expected the 16-bit range 0..65535"
            )
        return _gray_to_rgb((values.astype(np.uint32) >> 8).astype(np.uint8))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and (
            not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 1.0
        ):
            raise ValueError(
                f"{name}: float image (mode F) with values in [{np.nanmin(values):g}, "
                f"{np.nanmax(values):g}]; expected the float range 0..1"
            )
        return _gray_to_rgb(np.round(values * 255.0).astype(np.uint8))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow warns on P -> RGB with transparency
    elif mode in _ALPHA:
        image = image.convert("RGBA")  # un-premultiplies RGBa / La; LA, PA to RGBA
    try:
        return image.convert("RGB")  # drops alpha: the stored colour is kept
    except ValueError as e:
        raise ValueError(f"{name}: image mode {mode} cannot be converted to RGB ({e})") from e


def read_image(path):
    """Read an image file as 8-bit RGB, the same way in training, evaluation and extraction.

    The whole file is decoded (a truncated file is an error), EXIF orientation is applied as
    in fast-reid's ``read_image``, and every mode is converted by the rules of this module.

    Args:
        path (str | os.PathLike): image file.
    Returns:
        PIL.Image.Image: mode "RGB", ``[H, W]`` after EXIF rotation.
    Raises:
        ImageReadError (OSError): the file is missing, empty, not an image, truncated or of an
            unconvertible mode; the message names the absolute path and the reason.
    """
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            raise ImageReadError(path, "empty file (0 bytes)")
        with open(path, "rb") as f, _StrictTruncation():
            image = Image.open(f)
            image.load()  # decode everything now: Image.open only reads the header
        try:
            # as fast-reid: https://github.com/python-pillow/Pillow/issues/3973
            image = ImageOps.exif_transpose(image)
        except Exception:
            pass
        return to_rgb(image, os.path.abspath(path))
    except ImageReadError:
        raise
    except Image.UnidentifiedImageError as e:
        raise ImageReadError(path, "not an image file (Pillow cannot identify its format)") from e
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, struct.error, ...
        reason = str(e)
        if reason.startswith(os.path.abspath(path) + ": "):
            reason = reason[len(os.path.abspath(path)) + 2 :]
        raise ImageReadError(path, f"{type(e).__name__}: {reason}") from e


# --------------------------------------------------------------------------------------------
# checking many files, with a cache
# --------------------------------------------------------------------------------------------
def cache_dir():
    """reidzoo's cache folder: ``$REIDZOO_CACHE``, else ``~/.cache/reidzoo``.

    Returns:
        str: an absolute path (it may not exist yet).
    """
    root = os.environ.get("REIDZOO_CACHE") or os.path.join("~", ".cache", "reidzoo")
    return os.path.abspath(os.path.expanduser(root))


def _cache_file(folder):
    digest = hashlib.sha1(folder.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return os.path.join(cache_dir(), "image_checks", f"{digest}.json")


def _cache_stamp():
    return {"reader": READER_VERSION, "pillow": PIL.__version__}


def _load_cache(folder):
    """``{basename: [size, mtime_ns]}`` of the files of ``folder`` that decoded before."""
    try:
        with open(_cache_file(folder)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if data.get("folder") != folder or data.get("stamp") != _cache_stamp():
        return {}
    ok = data.get("ok")
    return ok if isinstance(ok, dict) else {}


def _save_cache(folder, ok):
    from reidzoo.checkpoint import atomic_write

    payload = {"folder": folder, "stamp": _cache_stamp(), "ok": ok}
    try:
        atomic_write(_cache_file(folder), lambda f: json.dump(payload, f), mode="w")
    except OSError as e:  # a read-only home only costs the next run a re-check
        logger.warning("cannot write the image-check cache %s: %s", _cache_file(folder), e)


def _decode(path):
    """None if ``path`` decodes, else the reason."""
    try:
        read_image(path)
    except ImageReadError as e:
        return e.reason
    return None


def find_unreadable(paths, use_cache=True, progress=True, desc="checking images", threads=None):
    """Decode every file once with :func:`read_image`; return those that fail, with why.

    A file that decoded before with the same absolute path, size and ``mtime_ns`` (and the
    same reader rules and Pillow version) is not decoded again. A progress bar appears when
    the check runs longer than two seconds.

    Args:
        paths (Iterable[str]): image files (duplicates are checked once).
        use_cache (bool): read and update the cache under :func:`cache_dir`.
        progress (bool): allow the progress bar (pass False on non-main processes).
        desc (str): progress bar label.
        threads (int | None): decoding threads (Pillow decodes without the GIL); default
            ``min(8, os.cpu_count())``.
    Returns:
        dict[str, str]: absolute path -> reason, in first-seen order; empty when all decode.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    unique = list(dict.fromkeys(os.path.abspath(os.fspath(p)) for p in paths))
    by_folder = {}
    for p in unique:
        by_folder.setdefault(os.path.dirname(p), []).append(p)
    failures, todo, stats = {}, [], {}
    caches = {}
    for folder, files in by_folder.items():
        cache = _load_cache(folder) if use_cache else {}
        caches[folder] = cache
        for p in files:
            try:
                st = os.stat(p)
            except OSError as e:
                failures[p] = f"{type(e).__name__}: {e.strerror or e}"
                continue
            stats[p] = [st.st_size, st.st_mtime_ns]
            if cache.get(os.path.basename(p)) != stats[p]:
                todo.append(p)
    threads = threads or min(8, os.cpu_count() or 1)
    with tqdm(total=len(todo), desc=desc, unit="img", delay=2.0, disable=not progress) as bar:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for p, reason in zip(todo, pool.map(_decode, todo)):
                bar.update(1)
                if reason is None:
                    caches[os.path.dirname(p)][os.path.basename(p)] = stats[p]
                else:
                    failures[p] = reason
    if use_cache and todo:
        for folder in {os.path.dirname(p) for p in todo}:
            _save_cache(folder, caches[folder])
    logger.info(
        "%s: %d images, %d decoded, %d known from the cache, %d unreadable (%.1f s)",
        desc,
        len(unique),
        len(todo),
        len(stats) - len(todo),
        len(failures),
        time.perf_counter() - start,
    )
    return {p: failures[p] for p in unique if p in failures}


def check_images(groups, use_cache=True, progress=True):
    """Raise one error naming every file of ``groups`` that cannot be read.

    Args:
        groups (dict[str, Iterable[str]]): label (e.g. ``"Market1501 query"``) -> image files.
        use_cache (bool): see :func:`find_unreadable`.
        progress (bool): see :func:`find_unreadable`.
    Raises:
        UnreadableImagesError (OSError): lists each unreadable file (absolute path), its group
            and the reason.
    """
    labels = {}
    for label, paths in groups.items():
        for p in paths:
            labels.setdefault(os.path.abspath(os.fspath(p)), label)
    failures = find_unreadable(labels, use_cache=use_cache, progress=progress)
    if failures:
        raise UnreadableImagesError(failures, total=len(labels), labels=labels)
