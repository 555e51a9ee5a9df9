"""SyntheticReID: a procedurally drawn person re-id dataset in Market-1501 layout.

No real data can be downloaded on the machines this project runs on, so demos, smoke tests and
quick method comparisons use a synthetic dataset that is generated once, deterministically from a
seed, into ``<root>/SyntheticReID/<signature>/`` with the usual Market-1501 sub-folders
(``bounding_box_train``, ``query``, ``bounding_box_test``) and file names
``<pid:04d>_c<cam>s1_<frame:06d>_00.jpg`` (pids start at 1, cameras at 1).

What the images contain, and why:

* Identities come in *confusable groups* of ``group_size``: members of a group share the coarse
  appearance (shirt and trouser colour, sleeve and trouser length, body shape, skin and hair),
  and differ only in small local details (a logo on the torso, a bag, shoe colour, a hat). Two
  members of a group differ in at least two of these four details, so that a global colour
  histogram is not enough and local features matter.
* Each camera has its own illumination (gain and colour cast), person scale, vertical
  misalignment (boxes shifted so that heads or feet are cut off), blur, occlusion rate (random
  rectangles entering from an edge) and background (texture and colours).
* Every image adds its own jitter (scale, position, gait, mirror flip, brightness) and noise.

The folder is generated only if absent, into a temporary sibling that is renamed into place once
complete; ``meta.json`` is written last inside it. An interrupted generation therefore never
leaves a folder that a later run would use.
"""

import colorsys
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile

import numpy as np
from fastreid.data.datasets.bases import ImageDataset
from PIL import Image, ImageDraw, ImageFilter

from reidzoo.config import add_node, register_config
from reidzoo.registry import DATASET_REGISTRY

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULTS",
    "GENERATOR_VERSION",
    "SUBSETS",
    "SyntheticReID",
    "TINY",
    "add_synthetic_config",
    "ensure_synthetic",
    "parse_name",
    "signature",
    "synthetic_kwargs",
]

#: Bumped whenever the drawing changes, so that old folders are not reused for new images.
GENERATOR_VERSION = 1
#: Folder under the dataset root that holds one sub-folder per parameter signature.
DATASET_DIR = "SyntheticReID"
#: Marker written last into a complete dataset folder.
META_FILE = "meta.json"
#: Market-1501 sub-folders: train, query, gallery.
SUBSETS = ("bounding_box_train", "query", "bounding_box_test")

#: Default generation parameters (constructor keyword arguments). About 1.5k images of 128x64,
#: generated in a few seconds.
DEFAULTS = {
    "num_train_ids": 80,
    "num_test_ids": 48,
    "num_cameras": 3,
    "num_query_cameras": 2,
    "images_per_id_per_cam": 4,
    "height": 128,
    "width": 64,
    "seed": 0,
    "group_size": 4,
}
#: A tiny size for unit tests: 8 + 8 ids, 2 cameras, 2 images per id and camera, 64x32.
TINY = dict(
    DEFAULTS,
    num_train_ids=8,
    num_test_ids=8,
    num_cameras=2,
    images_per_id_per_cam=2,
    height=64,
    width=32,
)

_NAME_RE = re.compile(r"^(\d{4})_c(\d)s1_(\d{6})_00\.jpg$")
_SUPERSAMPLE = 2  # drawn at 2x then box-filtered down: cheap anti-aliasing
_JPEG_QUALITY = 92

# Detail colours (RGB): saturated and far from each other, for logos, bags, shoes and hats.
_PALETTE = (
    (220, 30, 30),
    (245, 215, 30),
    (245, 245, 245),
    (20, 20, 20),
    (30, 200, 220),
    (210, 40, 200),
    (245, 130, 20),
    (40, 170, 60),
    (40, 70, 220),
    (130, 80, 40),
)
_LOGO_SHAPES = ("circle", "square", "triangle", "bar", "cross")
_LOGO_POSITIONS = ("left", "centre", "right")
_BAGS = ("none", "strap", "handbag", "backpack")
_BACKGROUNDS = ("hstripes", "vstripes", "checker", "gradient", "blocks")


# ------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------
@register_config
def add_synthetic_config(cfg):
    """``DATASETS.SYNTHETIC``: generation parameters of :class:`SyntheticReID`.

    Args:
        cfg (CfgNode): root config, modified in place.
    """
    add_node(
        cfg,
        "DATASETS.SYNTHETIC",
        {
            # Identities in bounding_box_train (pids 1..NUM_TRAIN_IDS).
            "NUM_TRAIN_IDS": DEFAULTS["num_train_ids"],
            # Identities in query/gallery (the pids after the training ones).
            "NUM_TEST_IDS": DEFAULTS["num_test_ids"],
            # Cameras (2..9); each has its own illumination, scale, offset, blur and background.
            "NUM_CAMERAS": DEFAULTS["num_cameras"],
            # Cameras 1..NUM_QUERY_CAMERAS give one query image per test id each.
            "NUM_QUERY_CAMERAS": DEFAULTS["num_query_cameras"],
            # Images of every identity in every camera.
            "IMAGES_PER_ID_PER_CAM": DEFAULTS["images_per_id_per_cam"],
            # Image height in pixels.
            "HEIGHT": DEFAULTS["height"],
            # Image width in pixels.
            "WIDTH": DEFAULTS["width"],
            # Seed of the generator: same seed and sizes give byte-identical files.
            "SEED": DEFAULTS["seed"],
            # Identities per confusable group (same coarse appearance, different details).
            "GROUP_SIZE": DEFAULTS["group_size"],
        },
    )


def synthetic_kwargs(cfg):
    """Constructor keyword arguments of :class:`SyntheticReID` from ``cfg.DATASETS.SYNTHETIC``.

    Keys missing from the config (e.g. the hook did not run) take their :data:`DEFAULTS`.

    Args:
        cfg (CfgNode): root config.
    Returns:
        dict[str, int]: ``num_train_ids``, ``num_test_ids``, ... (lower-case config keys).
    """
    node = cfg.DATASETS.get("SYNTHETIC", None) or {}
    return {key: int(node.get(key.upper(), default)) for key, default in DEFAULTS.items()}


# ------------------------------------------------------------------------------------------
# parameters, signature, file names
# ------------------------------------------------------------------------------------------
def _check_params(params):
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown SyntheticReID parameters {unknown}; known: {sorted(DEFAULTS)}")
    p = dict(DEFAULTS)
    p.update(params)
    for key, value in p.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"SyntheticReID parameter {key} must be an int, got {value!r}")
        p[key] = int(value)
    minimum = {
        "num_train_ids": 1,
        "num_test_ids": 1,
        "num_cameras": 2,
        "num_query_cameras": 1,
        "images_per_id_per_cam": 1,
        "height": 16,
        "width": 8,
        "seed": 0,
        "group_size": 1,
    }
    for key, low in minimum.items():
        if p[key] < low:
            raise ValueError(f"SyntheticReID parameter {key} must be >= {low}, got {p[key]}")
    if p["num_cameras"] > 9:
        raise ValueError(f"num_cameras must be <= 9 (one digit, as Market), got {p['num_cameras']}")
    if p["num_query_cameras"] > p["num_cameras"]:
        raise ValueError(
            f"num_query_cameras ({p['num_query_cameras']}) > num_cameras ({p['num_cameras']})"
        )
    if p["num_train_ids"] + p["num_test_ids"] > 9999:
        raise ValueError("num_train_ids + num_test_ids must be <= 9999 (4-digit pids)")
    total = (p["num_train_ids"] + p["num_test_ids"]) * p["num_cameras"]
    if total * p["images_per_id_per_cam"] > 999999:
        raise ValueError("too many images for 6-digit frame numbers")
    return p


def signature(**params):
    """Folder name for a set of generation parameters.

    Readable prefix plus a short hash of all parameters and :data:`GENERATOR_VERSION`, so that
    different sizes, seeds or generator versions never share a folder.

    Args:
        **params: generation parameters (missing ones take :data:`DEFAULTS`).
    Returns:
        str: e.g. ``"n80-48_c3_128x64_s0_1a2b3c4d"``.
    """
    p = _check_params(params)
    blob = json.dumps({"version": GENERATOR_VERSION, **p}, sort_keys=True).encode()
    digest = hashlib.sha1(blob).hexdigest()[:8]
    return (
        f"n{p['num_train_ids']}-{p['num_test_ids']}_c{p['num_cameras']}_"
        f"{p['height']}x{p['width']}_s{p['seed']}_{digest}"
    )


def _file_name(pid, cam, frame):
    return f"{pid:04d}_c{cam}s1_{frame:06d}_00.jpg"


def parse_name(path):
    """Parse a Market-1501 style file name written by the generator.

    Args:
        path (str): file path or name, ``<pid:04d>_c<cam>s1_<frame:06d>_00.jpg``.
    Returns:
        tuple[int, int, int]: ``(pid, cam, frame)``; ``cam`` counts from 1.
    Raises:
        ValueError: the name does not have that form (the message names the file).
    """
    m = _NAME_RE.match(os.path.basename(path))
    if m is None:
        raise ValueError(
            f"cannot parse SyntheticReID file name '{path}': "
            "expected <pid:04d>_c<cam>s1_<frame:06d>_00.jpg"
        )
    return tuple(int(g) for g in m.groups())


# ------------------------------------------------------------------------------------------
# appearance: groups, identities, cameras
# ------------------------------------------------------------------------------------------
def _hsv(h, s, v):
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def _far_colour(rng, avoid, min_dist=120.0):
    """A palette index whose colour is at least ``min_dist`` from every colour in ``avoid``."""
    order = rng.permutation(len(_PALETTE))
    for i in order:
        if all(np.linalg.norm(np.subtract(_PALETTE[i], a)) >= min_dist for a in avoid):
            return int(i)
    return int(order[0])


def _group_appearance(rng):
    """Coarse appearance shared by all members of a group."""
    skin_v = rng.uniform(0.35, 0.95)
    return {
        "shirt": _hsv(rng.uniform(), rng.uniform(0.25, 0.9), rng.uniform(0.3, 0.95)),
        "trousers": _hsv(rng.uniform(), rng.uniform(0.1, 0.8), rng.uniform(0.12, 0.7)),
        "skin": _hsv(rng.uniform(0.03, 0.09), rng.uniform(0.3, 0.6), skin_v),
        "hair": _hsv(rng.uniform(0.02, 0.12), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.5)),
        "long_sleeves": bool(rng.uniform() < 0.5),
        "shorts": bool(rng.uniform() < 0.25),
        "torso_width": float(rng.uniform(0.26, 0.36)),  # fraction of the person height
        "leg_width": float(rng.uniform(0.085, 0.12)),
        "head_radius": float(rng.uniform(0.058, 0.072)),
    }


def _details(rng, shirt):
    """Local details of one identity: ``(logo, bag, shoes, hat)``."""
    logo = (
        _LOGO_SHAPES[rng.integers(len(_LOGO_SHAPES))],
        _far_colour(rng, [shirt]),
        _LOGO_POSITIONS[rng.integers(len(_LOGO_POSITIONS))],
    )
    bag_kind = _BAGS[rng.integers(len(_BAGS))]
    bag = (bag_kind, _far_colour(rng, [shirt], 90.0) if bag_kind != "none" else -1)
    shoes = int(rng.integers(len(_PALETTE)))
    hat = int(rng.integers(len(_PALETTE))) if rng.uniform() < 0.5 else -1  # -1: no hat
    return logo, bag, shoes, hat


def _build_identities(p):
    """All identities: dict pid -> appearance, grouped per split.

    Returns:
        tuple[dict[int, dict], dict[int, int]]: appearance per pid, group id per pid.
    """
    identities, groups = {}, {}
    splits = (
        ("train", range(1, p["num_train_ids"] + 1)),
        ("test", range(p["num_train_ids"] + 1, p["num_train_ids"] + p["num_test_ids"] + 1)),
    )
    group_id = 0
    for split_code, (_, pids) in enumerate(splits):
        pids = list(pids)
        for start in range(0, len(pids), p["group_size"]):
            members = pids[start : start + p["group_size"]]
            rng = np.random.default_rng([p["seed"], 1, split_code, start])
            coarse = _group_appearance(rng)
            chosen = []
            for pid in members:
                # Rejection sampling: differ from every group mate in >= 2 of the 4 details.
                for _ in range(1000):
                    det = _details(rng, coarse["shirt"])
                    if all(sum(a != b for a, b in zip(det, other)) >= 2 for other in chosen):
                        break
                chosen.append(det)
                logo, bag, shoes, hat = det
                # A small per-identity shift of the shirt colour: not enough to separate ids.
                shirt = tuple(
                    int(np.clip(c + rng.integers(-6, 7), 0, 255)) for c in coarse["shirt"]
                )
                identities[pid] = dict(
                    coarse, shirt=shirt, logo=logo, bag=bag, shoes=shoes, hat=hat
                )
                groups[pid] = group_id
            group_id += 1
    return identities, groups


def _build_cameras(p):
    """Per-camera imaging conditions, deterministic from the seed."""
    rng = np.random.default_rng([p["seed"], 2])
    n = p["num_cameras"]
    gains = rng.permutation(np.linspace(0.6, 1.3, n))
    cameras = []
    for c in range(n):
        bg_kind = _BACKGROUNDS[(c + int(rng.integers(len(_BACKGROUNDS)))) % len(_BACKGROUNDS)]
        cameras.append(
            {
                "gain": float(gains[c]),
                "cast": [float(x) for x in 1.0 + rng.uniform(-0.18, 0.18, 3)],
                "scale": float(rng.uniform(0.72, 1.0)),  # person height / image height
                "offset": float(rng.uniform(-0.12, 0.12)),  # vertical shift / image height
                "blur": float(rng.uniform(0.0, 0.9)),  # Gaussian radius in output pixels
                "occlusion": float(rng.uniform(0.1, 0.45)),  # probability per image
                "noise": float(rng.uniform(2.0, 7.0)),  # Gaussian sigma, 0-255 scale
                "background": bg_kind,
                "bg_colours": [
                    _hsv(rng.uniform(), rng.uniform(0.0, 0.5), rng.uniform(0.25, 0.9))
                    for _ in range(2)
                ],
            }
        )
    return cameras


# ------------------------------------------------------------------------------------------
# drawing
# ------------------------------------------------------------------------------------------
def _background(cam, rng, h, w):
    """[h, w, 3] uint8 background of one image of camera ``cam``."""
    a = (np.asarray(cam["bg_colours"][0]) + rng.normal(0, 6, 3)).astype(np.float32)
    b = (np.asarray(cam["bg_colours"][1]) + rng.normal(0, 6, 3)).astype(np.float32)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]
    period = np.float32(h / rng.uniform(4, 9))
    phase = np.float32(rng.uniform(0, period))
    kind = cam["background"]
    if kind == "hstripes":
        t = ((yy + phase) // (period / 2)) % 2 + 0 * xx
    elif kind == "vstripes":
        t = ((xx + phase) // (period / 3)) % 2 + 0 * yy
    elif kind == "checker":
        t = (((yy + phase) // (period / 2)) + ((xx + phase) // (period / 2))) % 2
    elif kind == "gradient":
        t = np.clip(yy / h + np.float32(rng.uniform(-0.2, 0.2)), 0, 1) + 0 * xx
    else:  # blocks: coarse random patches
        cells = rng.uniform(0, 1, (max(2, h // 24), max(2, w // 24))).astype(np.float32)
        ys = np.minimum(np.arange(h) * cells.shape[0] // h, cells.shape[0] - 1)
        xs = np.minimum(np.arange(w) * cells.shape[1] // w, cells.shape[1] - 1)
        t = cells[ys[:, None], xs[None, :]]
    img = a + (b - a) * t[..., None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw_logo(draw, shape, colour, cx, cy, r):
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "bar":
        draw.rectangle([cx - 1.4 * r, cy - 0.45 * r, cx + 1.4 * r, cy + 0.45 * r], fill=colour)
    else:  # cross
        t = 0.38 * r
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=colour)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=colour)


def _draw_person(draw, ident, cx, top, ph, rng):
    """Draw one person, ``ph`` pixels tall, centred on ``cx``, head at ``top``."""

    def Y(f):  # relative height -> y in pixels
        return top + f * ph

    def L(f):  # relative length -> pixels
        return f * ph

    tw = L(ident["torso_width"]) * rng.uniform(0.95, 1.05)
    lw = L(ident["leg_width"])
    stride = L(rng.uniform(0.0, 0.07))  # gait: legs apart
    swing = L(rng.uniform(-0.03, 0.03))  # arms swing
    skin, shirt, trousers = ident["skin"], ident["shirt"], ident["trousers"]
    # bag behind the body
    bag_kind, bag_c = ident["bag"]
    if bag_kind == "backpack":
        draw.rounded_rectangle(
            [cx + tw / 2 - L(0.02), Y(0.17), cx + tw / 2 + L(0.07), Y(0.44)],
            radius=L(0.02),
            fill=_PALETTE[bag_c],
        )
    # legs and shoes
    knee = 0.72 if ident["shorts"] else 0.93
    for side in (-1, 1):
        x = cx + side * (lw / 2 + L(0.005) + stride / 2)
        draw.rectangle([x - lw / 2, Y(0.5), x + lw / 2, Y(knee)], fill=trousers)
        if ident["shorts"]:
            draw.rectangle([x - lw / 2.6, Y(knee), x + lw / 2.6, Y(0.93)], fill=skin)
        draw.rectangle(
            [x - lw / 2 - L(0.01), Y(0.93), x + lw / 2 + L(0.025), Y(0.985)],
            fill=_PALETTE[ident["shoes"]],
        )
    # arms
    aw = L(0.065)
    for side in (-1, 1):
        x0 = cx + side * (tw / 2 + aw / 2)
        s = side * swing
        draw.polygon(
            [
                (x0 - aw / 2, Y(0.16)),
                (x0 + aw / 2, Y(0.16)),
                (x0 + aw / 2 + s, Y(0.48)),
                (x0 - aw / 2 + s, Y(0.48)),
            ],
            fill=shirt if ident["long_sleeves"] else skin,
        )
        if not ident["long_sleeves"]:
            draw.rectangle([x0 - aw / 2, Y(0.16), x0 + aw / 2, Y(0.25)], fill=shirt)
        draw.ellipse([x0 + s - aw / 2, Y(0.47), x0 + s + aw / 2, Y(0.52)], fill=skin)
    # torso
    draw.rounded_rectangle([cx - tw / 2, Y(0.15), cx + tw / 2, Y(0.52)], radius=L(0.03), fill=shirt)
    # logo
    shape, logo_c, pos = ident["logo"]
    lx = cx + {"left": -0.22, "centre": 0.0, "right": 0.22}[pos] * tw
    _draw_logo(draw, shape, _PALETTE[logo_c], lx, Y(0.28), L(0.04))
    # bag in front
    if bag_kind == "strap":
        draw.line(
            [(cx - tw / 2 + L(0.01), Y(0.16)), (cx + tw / 2 - L(0.01), Y(0.47))],
            fill=_PALETTE[bag_c],
            width=max(1, int(round(L(0.025)))),
        )
    elif bag_kind == "handbag":
        x = cx - tw / 2 - aw
        draw.rectangle([x - L(0.05), Y(0.44), x + L(0.04), Y(0.56)], fill=_PALETTE[bag_c])
    # head, hair, hat
    r = L(ident["head_radius"])
    hy = Y(0.075)
    draw.ellipse([cx - r, hy - r, cx + r, hy + r], fill=skin)
    draw.chord([cx - r, hy - r, cx + r, hy + r], 180, 360, fill=ident["hair"])
    if ident["hat"] >= 0:
        hat = _PALETTE[ident["hat"]]
        draw.chord([cx - r * 1.05, hy - r * 1.25, cx + r * 1.05, hy + r * 0.5], 180, 360, fill=hat)
        draw.rectangle([cx - r * 1.3, hy - r * 0.45, cx + r * 1.3, hy - r * 0.2], fill=hat)


def _draw_occluder(draw, rng, h, w):
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    side = rng.integers(3)
    if side == 0:  # from the bottom: a car, a railing, another pedestrian's shoulder
        oh = h * rng.uniform(0.2, 0.45)
        x0 = w * rng.uniform(-0.3, 0.5)
        draw.rectangle([x0, h - oh, x0 + w * rng.uniform(0.5, 1.0), h], fill=colour)
    else:  # from the left or right: a pole, a passer-by
        ow = w * rng.uniform(0.2, 0.4)
        y0 = h * rng.uniform(-0.2, 0.5)
        x0 = 0 if side == 1 else w - ow
        draw.rectangle([x0, y0, x0 + ow, y0 + h * rng.uniform(0.4, 1.0)], fill=colour)


def render_image(ident, cam, rng, height, width):
    """Draw one image of identity ``ident`` seen by camera ``cam``.

    Args:
        ident (dict): identity appearance (coarse group attributes plus details).
        cam (dict): camera conditions (gain, cast, scale, offset, blur, occlusion, noise,
            background).
        rng (numpy.random.Generator): per-image randomness.
        height (int): output height in pixels.
        width (int): output width in pixels.
    Returns:
        PIL.Image.Image: RGB image of size ``width x height``.
    """
    s = _SUPERSAMPLE
    h, w = height * s, width * s
    # The background is computed at output size (cheap) and drawn over at 2x.
    img = Image.fromarray(_background(cam, rng, height, width)).resize((w, h), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    ph = h * cam["scale"] * rng.uniform(0.95, 1.05)
    top = (h - ph) / 2 + h * (cam["offset"] + rng.uniform(-0.04, 0.04))
    cx = w / 2 + w * rng.uniform(-0.06, 0.06)
    _draw_person(draw, ident, cx, top, ph, rng)
    if rng.uniform() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        draw = ImageDraw.Draw(img)
    if rng.uniform() < cam["occlusion"]:
        _draw_occluder(draw, rng, h, w)
    img = img.resize((width, height), Image.Resampling.BOX)
    if cam["blur"] > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(cam["blur"]))
    arr = np.asarray(img, dtype=np.float32)
    gain = cam["gain"] * rng.uniform(0.92, 1.08)
    arr = arr * (np.float32(gain) * np.asarray(cam["cast"], dtype=np.float32))
    arr += np.float32(cam["noise"]) * rng.standard_normal(arr.shape, dtype=np.float32)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------
def _plan(p):
    """Every image to draw: list of ``(subset, pid, cam, k)``; cam counts from 1."""
    plan = []
    n_tr, n_te = p["num_train_ids"], p["num_test_ids"]
    for pid in range(1, n_tr + n_te + 1):
        for cam in range(1, p["num_cameras"] + 1):
            for k in range(p["images_per_id_per_cam"]):
                if pid <= n_tr:
                    subset = "bounding_box_train"
                elif k == 0 and cam <= p["num_query_cameras"]:
                    subset = "query"
                else:
                    subset = "bounding_box_test"
                plan.append((subset, pid, cam, k))
    return plan


def _generate_into(out_dir, p):
    """Write all images and, last, ``meta.json`` into ``out_dir`` (which exists)."""
    identities, groups = _build_identities(p)
    cameras = _build_cameras(p)
    for sub in SUBSETS:
        os.makedirs(os.path.join(out_dir, sub))
    counts = dict.fromkeys(SUBSETS, 0)
    for frame, (subset, pid, cam, k) in enumerate(_plan(p)):
        rng = np.random.default_rng([p["seed"], 3, pid, cam, k])
        img = render_image(identities[pid], cameras[cam - 1], rng, p["height"], p["width"])
        img.save(os.path.join(out_dir, subset, _file_name(pid, cam, frame)), quality=_JPEG_QUALITY)
        counts[subset] += 1
    meta = {
        "generator_version": GENERATOR_VERSION,
        "params": p,
        "counts": counts,
        "groups": {str(pid): g for pid, g in sorted(groups.items())},
        "cameras": cameras,
    }
    with open(os.path.join(out_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)


def _read_meta(folder):
    path = os.path.join(folder, META_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def ensure_synthetic(root="datasets", **params):
    """Generate the dataset for ``params`` under ``root`` unless it is already there.

    Generation writes into a temporary folder next to the final one, writes ``meta.json`` last
    and renames the folder into place, so the final folder exists only when complete. If
    another process finishes first, its folder is used and ours is discarded.

    Args:
        root (str): dataset root; the data goes to ``<root>/SyntheticReID/<signature>/``.
        **params: generation parameters (see :data:`DEFAULTS`).
    Returns:
        str: the dataset folder.
    """
    p = _check_params(params)
    parent = os.path.join(root, DATASET_DIR)
    final = os.path.join(parent, signature(**p))
    if _read_meta(final) is not None:
        return final
    if os.path.exists(final):  # only our rename creates it, so someone else left it half-done
        logger.warning("removing incomplete SyntheticReID folder %s", final)
        shutil.rmtree(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        logger.info("generating SyntheticReID %s into %s", p, final)
        _generate_into(tmp, p)
        try:
            os.rename(tmp, final)
        except OSError:
            if _read_meta(final) is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ------------------------------------------------------------------------------------------
# the dataset
# ------------------------------------------------------------------------------------------
@DATASET_REGISTRY.register()
class SyntheticReID(ImageDataset):
    """Procedurally drawn person re-id data in Market-1501 layout, generated on first use.

    Train pids and cameras follow fast-reid's training convention (``"syntheticreid_<pid>"``,
    ``"syntheticreid_<cam-1>"``); query and gallery use ``int`` pids and 0-based ``int`` camids.
    Query: one image (the first) of every test id in each of cameras 1..``num_query_cameras``;
    gallery: all other test images, including same-camera ones that evaluation ignores.

    Args:
        root (str): dataset root; data goes to ``<root>/SyntheticReID/<signature>/``.
        num_train_ids (int): training identities (pids ``1..num_train_ids``).
        num_test_ids (int): test identities (the following pids).
        num_cameras (int): cameras, 2..9.
        num_query_cameras (int): cameras that contribute query images.
        images_per_id_per_cam (int): images of every identity in every camera.
        height (int): image height.
        width (int): image width.
        seed (int): generator seed.
        group_size (int): identities per confusable group.
        **kwargs: passed to fast-reid's ``ImageDataset`` (``mode``, ``transform``, ...).
    """

    _junk_pids = [0, -1]
    dataset_name = "syntheticreid"

    @classmethod
    def from_config(cls, cfg):
        """Constructor keywords from ``cfg.DATASETS.SYNTHETIC`` (:func:`synthetic_kwargs`); how
        reidzoo's builder passes config values to a dataset
        (:func:`reidzoo.data.datasets.dataset_kwargs`).

        Args:
            cfg (CfgNode): root config.
        Returns:
            dict[str, int]
        """
        return synthetic_kwargs(cfg)

    def __init__(
        self,
        root="datasets",
        num_train_ids=DEFAULTS["num_train_ids"],
        num_test_ids=DEFAULTS["num_test_ids"],
        num_cameras=DEFAULTS["num_cameras"],
        num_query_cameras=DEFAULTS["num_query_cameras"],
        images_per_id_per_cam=DEFAULTS["images_per_id_per_cam"],
        height=DEFAULTS["height"],
        width=DEFAULTS["width"],
        seed=DEFAULTS["seed"],
        group_size=DEFAULTS["group_size"],
        **kwargs,
    ):
        self.root = root
        self.params = _check_params(
            dict(
                num_train_ids=num_train_ids,
                num_test_ids=num_test_ids,
                num_cameras=num_cameras,
                num_query_cameras=num_query_cameras,
                images_per_id_per_cam=images_per_id_per_cam,
                height=height,
                width=width,
                seed=seed,
                group_size=group_size,
            )
        )
        self.dataset_dir = ensure_synthetic(root, **self.params)
        self.meta = _read_meta(self.dataset_dir)
        self.train_dir, self.query_dir, self.gallery_dir = (
            os.path.join(self.dataset_dir, sub) for sub in SUBSETS
        )
        train = self.process_dir(self.train_dir, is_train=True)
        query = self.process_dir(self.query_dir, is_train=False)
        gallery = self.process_dir(self.gallery_dir, is_train=False)
        for sub, items in zip(SUBSETS, (train, query, gallery)):
            if len(items) != self.meta["counts"][sub]:
                raise RuntimeError(
                    f"{os.path.join(self.dataset_dir, sub)} holds {len(items)} images, "
                    f"meta.json says {self.meta['counts'][sub]}; delete {self.dataset_dir} "
                    "to regenerate it"
                )
        super().__init__(train, query, gallery, **kwargs)

    def process_dir(self, dir_path, is_train=True):
        """Read one sub-folder back, as fast-reid's ``Market1501.process_dir`` does.

        Args:
            dir_path (str): a sub-folder of the dataset.
            is_train (bool): prefix pid and camid with ``dataset_name`` (fast-reid's training
                convention).
        Returns:
            list[tuple[str, int | str, int | str]]: ``(img_path, pid, camid)``, sorted by path;
            camid counts from 0.
        Raises:
            ValueError: a file name cannot be parsed (the message names the file).
        """
        data = []
        for name in sorted(os.listdir(dir_path)):
            if name.startswith("."):
                continue
            path = os.path.join(dir_path, name)
            pid, cam, _ = parse_name(path)
            camid = cam - 1
            if is_train:
                pid = f"{self.dataset_name}_{pid}"
                camid = f"{self.dataset_name}_{camid}"
            data.append((path, pid, camid))
        return data
