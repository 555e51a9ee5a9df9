"""VIPeRSingleShot / PRID450S (single-shot half splits), dataset_kwargs and summarize_splits."""

import os

import numpy as np
import pytest
from fastreid.config import get_cfg as fastreid_get_cfg
from PIL import Image

from reidzoo.config import registered_config_hooks
from reidzoo.data.datasets import (
    NUM_SPLITS,
    PRID450S,
    SyntheticReID,
    VIPeRSingleShot,
    dataset_kwargs,
    split_identities,
    summarize_splits,
)
from reidzoo.data.small import add_split_config
from reidzoo.data.synthetic import add_synthetic_config
from reidzoo.registry import DATASET_REGISTRY
from tests.helpers import SHARED_DATA

# registry name, class, folder, identities, pid digits, camera digits
REAL = {
    "VIPeRSingleShot": (VIPeRSingleShot, "viper", 632, "{:04d}{:04d}.png"),
    "PRID450S": (PRID450S, "prid450s", 450, "{:04d}{:03d}.png"),
}


def _cfg():
    cfg = fastreid_get_cfg()
    add_synthetic_config(cfg)
    add_split_config(cfg)
    return cfg


def _real_root(name):
    folder = os.path.join(SHARED_DATA, REAL[name][1])
    if not os.path.isdir(folder):
        pytest.skip(f"shared data not found at {folder} (set REIDZOO_SHARED_DATA)")
    return SHARED_DATA


def _fake(root, name, num_ids=6, extra=()):
    """A tiny flat folder in ``name``'s layout; returns the dataset folder."""
    fmt = REAL[name][3]
    folder = os.path.join(root, REAL[name][1])
    os.makedirs(folder, exist_ok=True)
    for pid in range(1, num_ids + 1):
        for cam in (1, 2):
            img = np.full((16, 8, 3), pid * 20 + cam, dtype=np.uint8)
            Image.fromarray(img).save(os.path.join(folder, fmt.format(pid, cam)))
    for fname in extra:
        open(os.path.join(folder, fname), "wb").close()
    return folder


def _ids(items):
    return {pid for _, pid, _ in items}


# ------------------------------------------------------------------------------------------
# real data (skipped when ../shared/data is absent)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(REAL))
def test_real_half_split(name):
    root = _real_root(name)
    cls, folder, n_ids, _ = REAL[name]
    d = cls(root=root, split_index=0)
    half = n_ids // 2
    assert len(d.train_ids) == half and len(d.test_ids) == n_ids - half
    assert not set(d.train_ids) & set(d.test_ids)
    assert len(d.train) == 2 * half and len(d.query) == len(d.gallery) == n_ids - half
    # train: fast-reid's prefixed convention; both cameras of every train id
    prefix = cls.dataset_name + "_"
    assert all(isinstance(p, str) and p.startswith(prefix) for _, p, _ in d.train)
    assert {c for _, _, c in d.train} == {prefix + "0", prefix + "1"}
    assert {int(p[len(prefix) :]) for _, p, _ in d.train} == set(d.train_ids)
    # test: camera 1 is the query, camera 2 the gallery, one image each
    assert _ids(d.query) == _ids(d.gallery) == set(d.test_ids)
    assert {c for _, _, c in d.query} == {0} and {c for _, _, c in d.gallery} == {1}
    for path, pid, _ in d.query:
        assert os.path.basename(path) == REAL[name][3].format(pid, 1)
    for path, pid, _ in d.gallery:
        assert os.path.basename(path) == REAL[name][3].format(pid, 2)
    assert all(os.path.isfile(p) for p, _, _ in d.train + d.query + d.gallery)


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_splits_are_seeded(name):
    root = _real_root(name)
    cls = REAL[name][0]
    a, b, c = cls(root=root, split_index=0), cls(root=root, split_index=0), cls(root, 1)
    assert a.test_ids == b.test_ids and a.query == b.query and a.train == b.train
    assert a.test_ids != c.test_ids


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_folder_itself_as_root(name):
    root = _real_root(name)
    cls, folder = REAL[name][0], REAL[name][1]
    assert cls(root=os.path.join(root, folder)).query == cls(root=root).query


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_through_registry(name):
    root = _real_root(name)
    cfg = _cfg()
    cfg.DATASETS.SPLIT_INDEX = 3
    kwargs = dataset_kwargs(cfg, name)
    assert kwargs == {"split_index": 3}
    d = DATASET_REGISTRY.get(name)(root=root, **kwargs)
    assert isinstance(d, REAL[name][0]) and d.split_index == 3
    assert d.test_ids == REAL[name][0](root=root, split_index=3).test_ids
    q = DATASET_REGISTRY.get(name)(root=root, mode="query", **kwargs)
    assert q.data == d.query


# ------------------------------------------------------------------------------------------
# layouts and bad input (no shared data needed)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(REAL))
def test_fake_folder_parses(tmp_path, name):
    _fake(str(tmp_path), name, num_ids=6, extra=(".DS_Store",))
    d = REAL[name][0](root=str(tmp_path), split_index=2)
    assert len(d.train_ids) == len(d.test_ids) == 3
    assert len(d.train) == 6 and len(d.query) == len(d.gallery) == 3


@pytest.mark.parametrize("name", sorted(REAL))
def test_missing_root_names_path_and_layout(tmp_path, name):
    cls, folder = REAL[name][0], REAL[name][1]
    missing = os.path.join(str(tmp_path), "nowhere")
    with pytest.raises(FileNotFoundError) as e:
        cls(root=missing)
    assert os.path.join(missing, folder) in str(e.value)
    assert "PPPP" in str(e.value) and ".png" in str(e.value)


@pytest.mark.parametrize("name", sorted(REAL))
def test_empty_folder_names_path(tmp_path, name):
    cls, folder = REAL[name][0], REAL[name][1]
    empty = tmp_path / folder
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="PPPP") as e:
        cls(root=str(tmp_path))
    assert str(empty) in str(e.value)


@pytest.mark.parametrize("name", sorted(REAL))
def test_unparseable_file_names_the_file(tmp_path, name):
    _fake(str(tmp_path), name, extra=("readme.txt",))
    with pytest.raises(ValueError, match="readme.txt"):
        REAL[name][0](root=str(tmp_path))


def test_bad_camera_and_missing_camera(tmp_path):
    folder = _fake(str(tmp_path), "VIPeRSingleShot", extra=("00010003.png",))
    with pytest.raises(ValueError, match="00010003.png"):
        VIPeRSingleShot(root=str(tmp_path))
    os.remove(os.path.join(folder, "00010003.png"))
    os.remove(os.path.join(folder, "00020002.png"))
    with pytest.raises(ValueError, match="lack an image"):
        VIPeRSingleShot(root=str(tmp_path))


def test_bad_split_index(tmp_path):
    _fake(str(tmp_path), "PRID450S")
    with pytest.raises(ValueError, match="split_index"):
        PRID450S(root=str(tmp_path), split_index=-1)
    with pytest.raises(TypeError, match="split_index"):
        PRID450S(root=str(tmp_path), split_index="1")


# ------------------------------------------------------------------------------------------
# splits, kwargs, summaries
# ------------------------------------------------------------------------------------------
def test_split_identities():
    pids = list(range(1, 633))
    splits = [split_identities(pids, k) for k in range(NUM_SPLITS)]
    assert NUM_SPLITS == 10
    for train, test in splits:
        assert len(train) == len(test) == 316 and not set(train) & set(test)
        assert sorted(train + test) == pids
    assert len({tuple(test) for _, test in splits}) == NUM_SPLITS
    assert split_identities(reversed(pids), 4) == splits[4]  # order of the input is irrelevant
    train, test = split_identities(range(5), 0)
    assert len(train) == 2 and len(test) == 3


def test_dataset_kwargs_and_config():
    cfg = _cfg()
    assert cfg.DATASETS.SPLIT_INDEX == 0
    assert add_split_config in registered_config_hooks()
    assert DATASET_REGISTRY.get("VIPeRSingleShot") is VIPeRSingleShot
    assert DATASET_REGISTRY.get("PRID450S") is PRID450S
    assert DATASET_REGISTRY.get("SyntheticReID") is SyntheticReID
    assert dataset_kwargs(cfg, "PRID450S") == {"split_index": 0}
    assert (
        dataset_kwargs(cfg, "SyntheticReID")["num_train_ids"]
        == cfg.DATASETS.SYNTHETIC.NUM_TRAIN_IDS
    )
    assert dataset_kwargs(cfg, "Market1501") == {}
    assert dataset_kwargs(cfg, "VIPeR") == {}  # fast-reid's own VIPeR layout: no split
    with pytest.raises(KeyError, match="NoSuchSet"):
        dataset_kwargs(cfg, "NoSuchSet")


def test_summarize_splits():
    results = [{"Rank-1": 10.0 + k, "mAP": 5.0, "metric": 7.5 + k, "name": "x"} for k in range(4)]
    s = summarize_splits(results)
    assert list(s) == ["Rank-1", "mAP", "metric"]
    assert s["Rank-1"]["mean"] == pytest.approx(11.5)
    assert s["Rank-1"]["std"] == pytest.approx(np.std([10, 11, 12, 13], ddof=1))
    assert s["mAP"] == {"mean": 5.0, "std": 0.0, "n": 4}
    nested = summarize_splits([{"PRID450S": {"mAP": 2.0}}, {"PRID450S": {"mAP": 4.0}}])
    assert nested["PRID450S/mAP"]["mean"] == pytest.approx(3.0)
    assert summarize_splits([{"mAP": 1.0}])["mAP"]["std"] == 0.0
    with pytest.raises(ValueError):
        summarize_splits([])
    with pytest.raises(ValueError, match="mAP"):
        summarize_splits([{"mAP": 1.0, "Rank-1": 2.0}, {"Rank-1": 2.0}])


def test_cuhk03_box_type_and_protocol_from_config():
    from reidzoo.config import get_cfg
    from reidzoo.data.datasets import dataset_kwargs

    cfg = get_cfg()
    assert dataset_kwargs(cfg, "CUHK03") == {
        "cuhk03_labeled": True,
        "cuhk03_classic_split": False,
        "split_id": 0,
    }
    cfg.DATASETS.CUHK03.LABELED = False
    cfg.DATASETS.SPLIT_INDEX = 3
    kw = dataset_kwargs(cfg, "CUHK03")
    assert kw["cuhk03_labeled"] is False and kw["split_id"] == 3
