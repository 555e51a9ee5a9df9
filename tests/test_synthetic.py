"""SyntheticReID: deterministic generation, layout, appearance, atomic writes, config."""

import json
import os

import numpy as np
import pytest
from fastreid.config import get_cfg as fastreid_get_cfg
from fastreid.data.common import CommDataset
from PIL import Image

from reidzoo.config import registered_config_hooks
from reidzoo.data import synthetic
from reidzoo.data.datasets import dataset_kwargs
from reidzoo.data.synthetic import (
    DEFAULTS,
    SUBSETS,
    TINY,
    SyntheticReID,
    add_synthetic_config,
    ensure_synthetic,
    parse_name,
    signature,
    synthetic_kwargs,
)
from reidzoo.registry import DATASET_REGISTRY


def _files(folder):
    out = {}
    for sub in SUBSETS:
        for name in sorted(os.listdir(os.path.join(folder, sub))):
            with open(os.path.join(folder, sub, name), "rb") as f:
                out[f"{sub}/{name}"] = f.read()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return SyntheticReID(root=str(tmp_path_factory.mktemp("synth")), **TINY)


def test_registered_and_config_hook():
    assert DATASET_REGISTRY.get("SyntheticReID") is SyntheticReID
    assert add_synthetic_config in registered_config_hooks()


def test_same_seed_byte_identical_other_seed_differs(tmp_path):
    a = ensure_synthetic(str(tmp_path / "a"), **TINY)
    b = ensure_synthetic(str(tmp_path / "b"), **TINY)
    fa, fb = _files(a), _files(b)
    assert os.path.basename(a) == os.path.basename(b) == signature(**TINY)
    assert fa.keys() == fb.keys() and all(fa[k] == fb[k] for k in fa)
    c = ensure_synthetic(str(tmp_path / "a"), **dict(TINY, seed=1))
    assert os.path.dirname(c) == os.path.dirname(a) and c != a  # no collision in one root
    fc = _files(c)
    assert fc.keys() == fa.keys()  # same names (same plan) ...
    assert sum(fa[k] != fc[k] for k in fa) == len(fa)  # ... but every image differs


def test_signature_depends_on_every_parameter():
    base = signature(**TINY)
    for key in DEFAULTS:
        other = TINY[key] - 1 if key == "num_query_cameras" else TINY[key] + 1
        assert signature(**dict(TINY, **{key: other})) != base, key


def test_layout_names_and_counts(tiny):
    p = TINY
    folder = tiny.dataset_dir
    assert folder == os.path.join(tiny.root, "SyntheticReID", signature(**p))
    assert sorted(os.listdir(folder)) == sorted([*SUBSETS, "meta.json"])
    n_cam, per = p["num_cameras"], p["images_per_id_per_cam"]
    n_query = p["num_test_ids"] * p["num_query_cameras"]
    assert len(tiny.train) == p["num_train_ids"] * n_cam * per
    assert len(tiny.query) == n_query
    assert len(tiny.gallery) == p["num_test_ids"] * n_cam * per - n_query
    frames = set()
    for path, _, _ in tiny.train + tiny.query + tiny.gallery:
        pid, cam, frame = parse_name(path)
        assert os.path.basename(path) == f"{pid:04d}_c{cam}s1_{frame:06d}_00.jpg"
        frames.add(frame)
        with Image.open(path) as im:
            assert im.size == (p["width"], p["height"]) and im.mode == "RGB"
    assert len(frames) == len(tiny.train) + len(tiny.query) + len(tiny.gallery)
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["params"] == p and meta["counts"]["query"] == n_query


def test_pids_and_camids(tiny):
    p = TINY
    train_pids = {parse_name(x[0])[0] for x in tiny.train}
    test_pids = {x[1] for x in tiny.query + tiny.gallery}
    assert min(train_pids) == 1 and train_pids == set(range(1, p["num_train_ids"] + 1))
    assert test_pids == set(
        range(p["num_train_ids"] + 1, p["num_train_ids"] + p["num_test_ids"] + 1)
    )
    # fast-reid's training convention: dataset-prefixed pid and camid
    path, pid, camid = tiny.train[0]
    n, c, _ = parse_name(path)
    assert pid == f"syntheticreid_{n}" and camid == f"syntheticreid_{c - 1}"
    # test: int pids, 0-based int camids
    assert all(isinstance(x[1], int) and isinstance(x[2], int) for x in tiny.query + tiny.gallery)
    assert {x[2] for x in tiny.query} == set(range(p["num_query_cameras"]))
    assert {x[2] for x in tiny.gallery} == set(range(p["num_cameras"]))
    gallery = {(x[1], x[2]) for x in tiny.gallery}
    for _, pid, cam in tiny.query:
        # a true match in another camera, and same-camera images that evaluation drops
        assert any((pid, c) in gallery for c in range(p["num_cameras"]) if c != cam)
        assert (pid, cam) in gallery
    # one query per test id and query camera
    assert len({(x[1], x[2]) for x in tiny.query}) == len(tiny.query)


def test_fastreid_reads_it(tiny):
    data = CommDataset(tiny.train, transform=None, relabel=True)
    item = data[0]
    assert data.num_classes == TINY["num_train_ids"]
    assert item["images"].size == (TINY["width"], TINY["height"])
    assert DATASET_REGISTRY.get("SyntheticReID")(root=tiny.root, mode="query", **TINY).data == (
        tiny.query
    )


def _mean_colour(paths, rows, cols):
    out = []
    for path in paths:
        a = np.asarray(Image.open(path), dtype=np.float64)
        h, w = a.shape[:2]
        out.append(a[int(rows[0] * h) : int(rows[1] * h), int(cols[0] * w) : int(cols[1] * w)])
    return np.mean([x.reshape(-1, 3).mean(0) for x in out], axis=0)


def test_groups_share_coarse_appearance(tmp_path):
    params = dict(TINY, num_train_ids=16, num_test_ids=4, images_per_id_per_cam=3)
    d = SyntheticReID(root=str(tmp_path), **params)
    groups = {int(k): v for k, v in d.meta["groups"].items()}
    by_pid = {}
    for path, _, _ in d.train:
        by_pid.setdefault(parse_name(path)[0], []).append(path)
    # torso: rows 30-45% of the height, central columns (camera offsets move it a little)
    torso = {pid: _mean_colour(paths, (0.3, 0.45), (0.4, 0.6)) for pid, paths in by_pid.items()}
    within, across = [], []
    pids = sorted(torso)
    for i, a in enumerate(pids):
        for b in pids[i + 1 :]:
            dist = np.linalg.norm(torso[a] - torso[b])
            (within if groups[a] == groups[b] else across).append(dist)
    assert len(set(groups[p] for p in pids)) == 4
    assert np.mean(within) * 3 < np.mean(across), (np.mean(within), np.mean(across))
    # ... while group members differ in local details
    meta_ids = synthetic._build_identities(d.params)[0]
    for a in pids:
        for b in pids:
            if a < b and groups[a] == groups[b]:
                ia, ib = meta_ids[a], meta_ids[b]
                diffs = sum(ia[k] != ib[k] for k in ("logo", "bag", "shoes", "hat"))
                assert diffs >= 2


def test_cameras_differ(tiny):
    paths = [x[0] for x in tiny.train]
    mean = {}
    for cam in range(1, TINY["num_cameras"] + 1):
        sel = [p for p in paths if parse_name(p)[1] == cam]
        mean[cam] = _mean_colour(sel, (0, 1), (0, 1)).mean()
    assert max(mean.values()) > 1.2 * min(mean.values()), mean
    cams = tiny.meta["cameras"]
    for key in ("gain", "cast", "scale", "offset", "blur", "bg_colours"):
        assert len({json.dumps(c[key]) for c in cams}) == len(cams), key


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synthetic.render_image

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "render_image", failing)
    with pytest.raises(KeyboardInterrupt):
        SyntheticReID(root=str(tmp_path), **TINY)
    parent = tmp_path / "SyntheticReID"
    assert not (parent / signature(**TINY)).exists()
    assert os.listdir(parent) == []  # the temporary folder is gone too
    monkeypatch.setattr(synthetic, "render_image", real)
    d = SyntheticReID(root=str(tmp_path), **TINY)
    assert len(d.train) == TINY["num_train_ids"] * 2 * 2
    assert os.listdir(parent) == [signature(**TINY)]


def test_existing_folder_is_reused_and_half_folder_replaced(tmp_path, monkeypatch):
    first = ensure_synthetic(str(tmp_path), **TINY)

    def boom(*args, **kwargs):
        raise AssertionError("should not regenerate")

    monkeypatch.setattr(synthetic, "_generate_into", boom)
    assert ensure_synthetic(str(tmp_path), **TINY) == first
    monkeypatch.undo()
    os.remove(os.path.join(first, "meta.json"))  # e.g. a folder copied in half
    again = ensure_synthetic(str(tmp_path), **TINY)
    assert again == first and os.path.isfile(os.path.join(first, "meta.json"))


def test_bad_file_name_raises(tmp_path):
    d = SyntheticReID(root=str(tmp_path), **TINY)
    bad = os.path.join(d.query_dir, "notes.jpg")
    open(bad, "w").close()
    with pytest.raises(ValueError, match="notes.jpg"):
        SyntheticReID(root=str(tmp_path), **TINY)
    with pytest.raises(ValueError, match="x_c1.jpg"):
        parse_name("/a/x_c1.jpg")


def test_bad_parameters():
    with pytest.raises(ValueError, match="num_cameras"):
        signature(**dict(TINY, num_cameras=1))
    with pytest.raises(ValueError, match="num_query_cameras"):
        signature(**dict(TINY, num_query_cameras=3))
    with pytest.raises(TypeError, match="unknown"):
        signature(num_ids=3)


def test_kwargs_from_config(tmp_path):
    cfg = fastreid_get_cfg()
    add_synthetic_config(cfg)
    assert synthetic_kwargs(cfg) == DEFAULTS
    cfg.merge_from_list(["DATASETS.SYNTHETIC.NUM_TRAIN_IDS", 8, "DATASETS.SYNTHETIC.SEED", 3])
    kw = synthetic_kwargs(cfg)
    assert kw["num_train_ids"] == 8 and kw["seed"] == 3
    cfg = fastreid_get_cfg()
    add_synthetic_config(cfg)
    cfg.merge_from_list(
        [k for key, v in TINY.items() for k in (f"DATASETS.SYNTHETIC.{key.upper()}", v)]
    )
    kw = dataset_kwargs(cfg, "SyntheticReID")
    assert kw == TINY
    d = DATASET_REGISTRY.get("SyntheticReID")(root=str(tmp_path), **kw)
    assert len(d.query) == TINY["num_test_ids"] * TINY["num_query_cameras"]
