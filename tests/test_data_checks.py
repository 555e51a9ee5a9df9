"""Bad data caught before training: one image reader (8-bit RGB from every mode), every image
decoded up front with one error naming each unreadable file, a cache that skips the second
check, the identity-sampler hang refused with its numbers, and Market/Duke naming errors."""

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from reidzoo.data import images
from reidzoo.data.build import (
    IdentitySamplerError,
    build_dataset,
    check_datasets,
    check_identity_sampler,
)
from reidzoo.data.images import (
    ImageReadError,
    UnreadableImagesError,
    check_images,
    find_unreadable,
    read_image,
)
from tests.helpers import REPO, tiny_cfg, write_market

H, W = 64, 32  # tiny_cfg's image size


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets its own image-check cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("REIDZOO_CACHE", str(folder))
    return folder


def _variants(seed=0):
    """Images of every mode the reader converts: name -> (PIL image to save, file extension,
    the 8-bit RGB pixels the reader must give)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (H, W), dtype=np.uint8)
    alpha = rng.integers(0, 256, (H, W), dtype=np.uint8)
    alpha[:4] = 0  # fully transparent rows keep their stored colour too
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (H, W), dtype=np.uint8)
    v16 = rng.integers(0, 65536, (H, W), dtype=np.uint32)
    v16[0, :3] = (0, 255, 65535)  # 16-bit 255 is near black: Pillow's convert makes it 255
    v16[1] = gray[1].astype(np.uint32) * 257  # 8-bit values stored the usual 16-bit way
    f = rng.random((H, W)).astype(np.float32)
    f[0, :2] = (0.0, 1.0)
    bits = rng.random((H, W)) > 0.5

    def rep(g):
        return np.repeat(g[:, :, None], 3, axis=2)

    pal = Image.fromarray(index, mode="P")
    pal.putpalette(palette.flatten().tolist())
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3
    high_byte = (v16 >> 8).astype(np.uint8)
    return {
        "rgba": (Image.fromarray(np.dstack([rgb, alpha])), "png", rgb),
        "la": (Image.fromarray(np.dstack([gray, alpha])), "png", rep(gray)),
        "palette": (pal, "png", palette[index]),
        "palette_transparency": (pal_t, "png", palette[index]),
        "gray": (Image.fromarray(gray), "png", rep(gray)),
        "bilevel": (Image.fromarray(bits), "png", rep(bits.astype(np.uint8) * 255)),
        "gray16_png": (Image.fromarray(v16.astype(np.uint16)), "png", rep(high_byte)),
        "gray16b_tiff": (Image.fromarray(v16.astype(">u2")), "tif", rep(high_byte)),
        "float_tiff": (Image.fromarray(f), "tif", rep(np.round(f * 255).astype(np.uint8))),
    }


def _save(image, path, ext):
    image.save(path, format={"png": "PNG", "tif": "TIFF", "jpg": "JPEG"}[ext])


def _truncated_jpeg(path, seed=1):
    pixels = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=95)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


# ------------------------------------------------------------------------------------------
# the reader
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(_variants()))
def test_every_mode_reads_as_8bit_rgb(tmp_path, name):
    image, ext, expected = _variants()[name]
    path = tmp_path / f"img.{ext}"
    _save(image, path, ext)
    with Image.open(path) as raw:
        assert raw.mode != "RGB"  # the file really holds the mode under test
    out = read_image(path)
    assert out.mode == "RGB" and out.size == (W, H)
    np.testing.assert_array_equal(np.asarray(out), expected)
    # the trainer's datasets and the extractor read through the same function
    from reidzoo.data.build import ReidDataset
    from reidzoo.inference import to_pil

    item = ReidDataset([(str(path), 1, 1)], transform=None, relabel=False)[0]
    np.testing.assert_array_equal(np.asarray(item["images"]), expected)
    np.testing.assert_array_equal(np.asarray(to_pil(str(path))), expected)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    v = np.array([[0, 255, 256, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(v).save(tmp_path / "g.png")
    assert np.asarray(read_image(tmp_path / "g.png"))[0, :, 0].tolist() == [0, 0, 1, 128, 255]
    # 16-bit PGM opens as mode "I": same scale
    with open(tmp_path / "g.pgm", "wb") as f:
        f.write(b"P5 5 1 65535\n" + v.astype(">u2").tobytes())
    with Image.open(tmp_path / "g.pgm") as raw:
        assert raw.mode == "I"
    assert np.asarray(read_image(tmp_path / "g.pgm"))[0, :, 0].tolist() == [0, 0, 1, 128, 255]


def test_cmyk_matches_pillow_and_exif_as_fastreid(tmp_path):
    src = np.random.default_rng(2).integers(0, 256, (6, 4, 3), dtype=np.uint8)
    cmyk = Image.fromarray(src).convert("CMYK")
    cmyk.save(tmp_path / "c.tif")
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "c.tif")), cmyk.convert("RGB"))
    image = Image.fromarray(src)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    image.save(tmp_path / "e.png", exif=exif)
    out = np.asarray(read_image(tmp_path / "e.png"))
    np.testing.assert_array_equal(out, np.rot90(src, -1))
    from fastreid.data.data_utils import read_image as fastreid_read  # never patched

    np.testing.assert_array_equal(out, np.asarray(fastreid_read(str(tmp_path / "e.png"))))


def test_out_of_scale_integer_and_float_images_are_errors(tmp_path):
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tmp_path / "i.tif")
    Image.fromarray(np.array([[0.0, 2.5]], dtype=np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ImageReadError, match=r"i\.tif.*0\.\.65535"):
        read_image(tmp_path / "i.tif")
    with pytest.raises(ImageReadError, match=r"f\.tif.*0\.\.1"):
        read_image(tmp_path / "f.tif")


def test_undecodable_files_name_the_file(tmp_path, monkeypatch):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    _truncated_jpeg(tmp_path / "cut.jpg")
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    # Pillow's tolerance for truncated files, set by some other library, must not apply
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    reasons = {"empty.jpg": "empty file", "text.jpg": "not an image", "cut.jpg": "truncated"}
    reasons["cut.png"] = "truncated"
    for name, reason in reasons.items():
        with pytest.raises(OSError, match=reason) as err:
            read_image(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored for whoever set it


# ------------------------------------------------------------------------------------------
# checking a dataset before training
# ------------------------------------------------------------------------------------------
def _market_with_bad_test_images(tmp_path):
    """A tiny Market-1501 whose test split holds every mode, plus broken files in query,
    gallery and train. Returns (root, the broken files)."""
    root = write_market(str(tmp_path / "data"), num_ids=4)
    base = os.path.join(root, "Market-1501-v15.09.15")
    variants = _variants()
    for i, (image, ext, _) in enumerate(variants.values()):
        sub = "query" if i % 2 else "bounding_box_test"
        # Market's loader globs *.jpg; the content decides the decoder
        _save(image, os.path.join(base, sub, f"{i % 4 + 1:04d}_c2s1_0001{i:02d}_00.jpg"), ext)
    bad = {
        os.path.join(base, "query", "0001_c1s1_000200_00.jpg"): "empty file",
        os.path.join(base, "bounding_box_test", "0002_c2s1_000201_00.jpg"): "truncated",
        os.path.join(base, "bounding_box_test", "0003_c1s1_000202_00.jpg"): "not an image",
        os.path.join(base, "bounding_box_train", "0004_c1s1_000203_00.jpg"): "empty file",
    }
    for path, reason in bad.items():
        if reason == "empty file":
            open(path, "wb").close()
        elif reason == "truncated":
            _truncated_jpeg(path)
        else:
            with open(path, "w") as f:
                f.write("<html>404</html>")
    return root, bad


def test_trainer_names_every_unreadable_image_before_training(tmp_path):
    from reidzoo.engine import ReidTrainer

    root, bad = _market_with_bad_test_images(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(UnreadableImagesError) as err:
        ReidTrainer(tiny_cfg(root, str(out)))
    assert set(err.value.failures) == set(bad)  # all of them, and only them
    message = str(err.value)
    for path, reason in bad.items():
        line = next(x for x in message.splitlines() if path in x)
        assert reason in line
    assert "[Market1501 query]" in message and "[train Market1501]" in message
    assert not glob.glob(str(out / "*.pth"))  # not one training step was run


def test_switched_off_check_and_test_loader_check(tmp_path):
    from reidzoo.engine import ReidTrainer

    root, bad = _market_with_bad_test_images(tmp_path)
    cfg = tiny_cfg(root, str(tmp_path / "out"), **{"DATASETS.CHECK_IMAGES": False})
    data = build_dataset(cfg, "Market1501")
    check_datasets(cfg, data.train)  # off: nothing decoded, nothing raised
    # the evaluation's loader checks its own split (an --eval-only run builds no trainer)
    cfg = tiny_cfg(root, str(tmp_path / "out"))
    with pytest.raises(UnreadableImagesError) as err:
        ReidTrainer.build_test_loader(cfg, "Market1501")
    test_files = {p for p in bad if "bounding_box_train" not in p}
    assert set(err.value.failures) == test_files


def test_cache_skips_decoding_the_second_time(tmp_path, cache, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i in range(5):
        Image.fromarray(np.full((8, 4, 3), i, np.uint8)).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    (folder / "empty.png").write_bytes(b"")
    paths.append(str(folder / "empty.png"))
    decoded = []
    real = images.read_image

    def counting(path):
        decoded.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(images, "read_image", counting)
    assert list(find_unreadable(paths)) == [str(folder / "empty.png")]
    assert sorted(decoded) == [f"{i}.png" for i in range(5)] + ["empty.png"]
    assert glob.glob(str(cache / "image_checks" / "*.json"))  # under $REIDZOO_CACHE
    decoded.clear()
    with pytest.raises(UnreadableImagesError):
        check_images({"again": paths})
    assert decoded == ["empty.png"]  # what decoded is not decoded again (failures are)
    # a changed file (new size or mtime) is decoded again, and only that one
    decoded.clear()
    Image.fromarray(np.zeros((8, 4, 3), np.uint8)).save(folder / "2.png")
    os.utime(folder / "2.png", ns=(1, 1))
    assert list(find_unreadable(paths)) == [str(folder / "empty.png")]
    assert sorted(decoded) == ["2.png", "empty.png"]
    # without the cache every file is decoded
    decoded.clear()
    find_unreadable(paths, use_cache=False)
    assert len(decoded) == 6


def test_cache_is_keyed_by_absolute_path(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((8, 4, 3), np.uint8)).save(tmp_path / "a.png")
    decoded = []
    real = images.read_image
    monkeypatch.setattr(images, "read_image", lambda p: decoded.append(p) or real(p))
    monkeypatch.chdir(tmp_path)
    find_unreadable(["a.png"])
    find_unreadable([str(tmp_path / "a.png")])  # the same file under its absolute name
    assert decoded == [str(tmp_path / "a.png")]
    entries = [json.load(open(p)) for p in glob.glob(os.environ["REIDZOO_CACHE"] + "/*/*.json")]
    assert [e["folder"] for e in entries] == [str(tmp_path)]


def test_training_and_extraction_read_the_same_pixels(tmp_path):
    """An RGBA / 16-bit / palette training set gives 3-channel batches, the test loader gives
    the expected pixels through the test transforms, and FeatureExtractor gives the features
    of the same pixels stored as plain RGB."""
    from reidzoo import FeatureExtractor
    from reidzoo.data.transforms import build_transforms_with_registry
    from reidzoo.engine import ReidTrainer

    root = write_market(str(tmp_path / "data"), num_ids=4)
    base = os.path.join(root, "Market-1501-v15.09.15")
    variants = list(_variants().values())
    expected = {}
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        for i, path in enumerate(sorted(glob.glob(os.path.join(base, sub, "*.jpg")))):
            image, ext, pixels = variants[i % len(variants)]
            _save(image, path, ext)  # every image of every split: none is RGB any more
            expected[path] = pixels
    cfg = tiny_cfg(root, str(tmp_path / "out"))
    batch = next(iter(ReidTrainer.build_train_loader(cfg)))
    assert tuple(batch["images"].shape) == (8, 3, H, W)

    loader, _ = ReidTrainer.build_test_loader(cfg, "Market1501")
    test_batch = next(iter(loader))
    transforms = build_transforms_with_registry(cfg, is_train=False)
    for path, tensor in zip(test_batch["img_paths"], test_batch["images"]):
        reference = transforms(Image.fromarray(expected[path]))
        torch.testing.assert_close(tensor, reference, rtol=0, atol=0)

    files = sorted(p for p in expected if "query" in p)[:4]
    twins = []
    for i, path in enumerate(files):
        twins.append(str(tmp_path / f"twin_{i}.png"))
        Image.fromarray(expected[path]).save(twins[-1])
    extractor = FeatureExtractor(cfg, allow_random_weights=True)
    np.testing.assert_array_equal(
        extractor.extract(files).features, extractor.extract(twins).features
    )


# ------------------------------------------------------------------------------------------
# identity samplers
# ------------------------------------------------------------------------------------------
def _sampler_cfg(sampler, batch, k, set_weight=()):
    return tiny_cfg(
        "unused",
        "unused",
        **{
            "DATALOADER.SAMPLER_TRAIN": sampler,
            "SOLVER.IMS_PER_BATCH": batch,
            "DATALOADER.NUM_INSTANCE": k,
            "DATALOADER.SET_WEIGHT": list(set_weight),
        },
    )


def _items(n_ids, per_id):
    return [
        (f"/x/{i}_{j}.jpg", f"d_{i}", f"d_{j % 2}") for i in range(n_ids) for j in range(per_id)
    ]


# sampler, identities, images per identity, IMS_PER_BATCH, NUM_INSTANCE, world size
SAMPLER_CASES = [
    ("NaiveIdentitySampler", 2, 4, 8, 2, 1),  # 2 identities, P = 4: the demo's hang
    ("NaiveIdentitySampler", 4, 4, 8, 2, 1),
    ("NaiveIdentitySampler", 8, 4, 9, 2, 1),  # 4 x 2 never adds up to 9
    ("NaiveIdentitySampler", 8, 4, 2, 4, 1),  # 2 // 4 = 0 identities per batch
    ("NaiveIdentitySampler", 4, 4, 16, 2, 2),  # 2 draws of 4 ids: 4 ids with 2 draws each
    ("NaiveIdentitySampler", 6, 2, 16, 2, 2),  # ... 6 ids with 1 draw each cannot
    ("NaiveIdentitySampler", 6, 2, 6, 2, 2),  # 3 per process, 1 x 2: adds up over 3 draws
    ("BalancedIdentitySampler", 3, 4, 8, 2, 1),
    ("BalancedIdentitySampler", 4, 4, 8, 2, 1),
    ("BalancedIdentitySampler", 8, 4, 9, 2, 1),
    ("BalancedIdentitySampler", 4, 4, 16, 2, 2),  # keeps N - N % (P x W) = 0 identities
    ("BalancedIdentitySampler", 8, 4, 16, 2, 2),
    ("BalancedIdentitySampler", 5, 4, 6, 2, 2),
    ("SetReWeightSampler", 10, 4, 8, 2, 1),
    ("TrainingSampler", 1, 1, 8, 2, 1),
]


class _NoBatch(Exception):
    pass


def _fastreid_yields(sampler, n_ids, per_id, batch, k, world):
    """Whether fast-reid's own sampler yields a first batch within 0.5 s (run for real)."""
    from fastreid.data import samplers
    from fastreid.utils import comm

    items = _items(n_ids, per_id)
    mini = batch // world
    state = np.random.get_state()
    patches = {"get_world_size": lambda: world, "get_rank": lambda: 0}
    saved = {name: getattr(comm, name) for name in patches}

    def alarm(*_):
        raise _NoBatch

    old = signal.signal(signal.SIGALRM, alarm)
    try:
        for name, fn in patches.items():
            setattr(comm, name, fn)
        if sampler == "TrainingSampler":
            s = samplers.TrainingSampler(len(items), seed=0)
        elif sampler == "SetReWeightSampler":
            s = samplers.SetReWeightSampler(items, mini, k, [1, 1], seed=0)
        else:
            s = getattr(samplers, sampler)(items, mini, k, seed=0)
        it = iter(s)
        signal.setitimer(signal.ITIMER_REAL, 0.5)  # a batch of these tiny sets takes ~1 ms
        for _ in range(mini):  # one process's first mini-batch
            next(it)
        return True
    except (_NoBatch, ZeroDivisionError, ValueError, AssertionError):
        return False
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        for name, fn in saved.items():
            setattr(comm, name, fn)
        np.random.set_state(state)


@pytest.mark.parametrize("case", SAMPLER_CASES, ids=lambda c: "-".join(map(str, c)))
def test_sampler_check_matches_fastreid(case):
    sampler, n_ids, per_id, batch, k, world = case
    cfg = _sampler_cfg(sampler, batch, k, set_weight=(1, 1))
    try:
        check_identity_sampler(cfg, _items(n_ids, per_id), world_size=world)
        refused = False
    except IdentitySamplerError as e:
        refused = True
        message = str(e)
        assert sampler in message and f"NUM_INSTANCE {k}" in message
        if sampler != "SetReWeightSampler" and batch // world >= k:
            assert f"IMS_PER_BATCH {batch}" in message
    assert refused == (not _fastreid_yields(*case))


def test_two_identities_are_refused_at_trainer_construction(tmp_path):
    """The demo's hang: 2 training identities, batch 8 = 4 identities x 2. In a subprocess with
    a timeout, so that a regression cannot hang the test suite."""
    root = write_market(str(tmp_path / "data"), num_ids=2)
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {REPO!r})
        from tests.helpers import tiny_cfg
        from reidzoo.engine import ReidTrainer
        ReidTrainer(tiny_cfg({root!r}, {str(tmp_path / "out")!r}))
        print("constructed")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "REIDZOO_CACHE": str(tmp_path / "cache")},
    )
    assert proc.returncode != 0 and "constructed" not in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("reidzoo.data.build.IdentitySamplerError: NaiveIdentitySampler")
    for part in ("at least 4 training identities", "IMS_PER_BATCH 8", "NUM_INSTANCE 2"):
        assert part in last
    assert "hold 2 identities" in last


# ------------------------------------------------------------------------------------------
# file names and paths
# ------------------------------------------------------------------------------------------
def test_badly_named_market_files_are_named(tmp_path):
    root = write_market(str(tmp_path / "data"), num_ids=3)
    base = os.path.join(root, "Market-1501-v15.09.15")
    pixels = np.zeros((H, W, 3), np.uint8)
    bad = {
        os.path.join(base, "bounding_box_train", "person_7.jpg"): "no '<pid>_c<camera>'",
        os.path.join(base, "query", "0002_c9s1_000000_00.jpg"): "camera 9 outside 1..6",
        os.path.join(base, "bounding_box_test", "2000_c1s1_000000_00.jpg"): "pid 2000",
    }
    for path in bad:
        Image.fromarray(pixels).save(path, format="JPEG")
    cfg = tiny_cfg(root, str(tmp_path / "out"))
    with pytest.raises(ValueError) as err:
        build_dataset(cfg, "Market1501")
    message = str(err.value)
    for path, reason in bad.items():
        assert f"{path}: {reason}" in message
    assert "0002_c1s1_000451_03.jpg" in message and "([-\\d]+)_c(\\d)" in message


def test_badly_named_duke_file_and_relative_root(tmp_path, monkeypatch):
    base = tmp_path / "data" / "DukeMTMC-reID"
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (base / sub).mkdir(parents=True)
    pixels = np.zeros((H, W, 3), np.uint8)
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        Image.fromarray(pixels).save(base / sub / "0001_c2_f0046182.jpg")
    Image.fromarray(pixels).save(base / "query" / "0001_f0046182.jpg")
    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg("data", str(tmp_path / "out"))  # a relative root: errors say it absolute
    with pytest.raises(ValueError, match="DukeMTMC: 1 file name") as err:
        build_dataset(cfg, "DukeMTMC")
    assert f"{base / 'query' / '0001_f0046182.jpg'}: no '<pid>_c<camera>'" in str(err.value)
    assert "camera 1..8" in str(err.value)
    cfg = tiny_cfg("missing", str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        build_dataset(cfg, "Market1501")
