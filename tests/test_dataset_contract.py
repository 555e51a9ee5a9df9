"""The dataset contract: config values reach any registered dataset through ``from_config``
and ``num_splits``, ``reidzoo.splits`` follows a dataset's splits and refuses data without
them, and a registry name clash is an error naming both registrations."""

import logging
import os

import pytest
from fastreid.data.datasets.bases import ImageDataset

from reidzoo.config import get_cfg
from reidzoo.data.build import build_dataset
from reidzoo.data.datasets import dataset_kwargs, dataset_num_splits
from reidzoo.registry import DATASET_REGISTRY, Registry, RegistryClashError
from reidzoo.splits import config_splits
from reidzoo.splits import main as splits_main


class ZooContractSet(ImageDataset):
    """A dataset outside reidzoo's own: three splits, one option of its own from the config."""

    num_splits = 3
    dataset_name = "zoocontract"

    @classmethod
    def from_config(cls, cfg):
        return {"option": cfg.OUTPUT_DIR}  # any config value the dataset wants

    def __init__(self, root="datasets", split_index=0, option=None, **kwargs):
        self.root, self.split_index, self.option = root, split_index, option
        self.kwargs = dict(kwargs)
        train = [(f"/x/{split_index}_{p}.png", f"zoocontract_{p}", "zoocontract_0") for p in (1, 2)]
        super().__init__(train, [("/x/q.png", 9, 0)], [("/x/g.png", 9, 1)], **kwargs)


class ZooNoSplitSet(ImageDataset):
    """A dataset without splits and without from_config."""

    def __init__(self, root="datasets", **kwargs):
        self.kwargs = dict(kwargs)
        super().__init__([("/x/a.png", "zoonosplit_1", "zoonosplit_0")], [], [], **kwargs)


for _cls in (ZooContractSet, ZooNoSplitSet):
    if _cls.__name__ not in DATASET_REGISTRY._obj_map:
        DATASET_REGISTRY.register(_cls)


def _cfg(tmp_path, name, **overrides):
    cfg = get_cfg()
    cfg.DATASETS.ROOT = str(tmp_path)
    cfg.DATASETS.NAMES = (name,)
    cfg.DATASETS.TESTS = (name,)
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


def test_split_index_and_from_config_reach_a_plugin_dataset(tmp_path):
    cfg = _cfg(tmp_path, "ZooContractSet", **{"DATASETS.SPLIT_INDEX": 2})
    data = build_dataset(cfg, "ZooContractSet")
    assert isinstance(data, ZooContractSet)
    assert data.split_index == 2  # DATASETS.SPLIT_INDEX, because it declares num_splits
    assert data.option == cfg.OUTPUT_DIR  # its from_config
    assert data.root == os.path.abspath(str(tmp_path))  # DATASETS.ROOT, absolute
    assert data.combineall is False  # DATASETS.COMBINEALL
    assert dataset_num_splits(cfg, "ZooContractSet") == 3
    assert config_splits(cfg) == [0, 1, 2]


def test_a_split_index_that_reaches_nothing_is_named(tmp_path, caplog):
    cfg = _cfg(tmp_path, "ZooNoSplitSet", **{"DATASETS.SPLIT_INDEX": 4})
    with caplog.at_level(logging.WARNING, logger="reidzoo.data.datasets"):
        assert dataset_kwargs(cfg, "ZooNoSplitSet") == {}
    assert "DATASETS.SPLIT_INDEX 4 does not reach dataset ZooNoSplitSet" in caplog.text
    assert build_dataset(cfg, "ZooNoSplitSet").kwargs == {"combineall": False}  # nothing else
    assert dataset_num_splits(cfg, "ZooNoSplitSet") is None


def test_builtin_datasets_declare_their_splits(tmp_path):
    cfg = _cfg(tmp_path, "VIPeRSingleShot")
    assert dataset_num_splits(cfg, "VIPeRSingleShot") == 10
    assert dataset_num_splits(cfg, "PRID450S") == 10
    assert dataset_num_splits(cfg, "Market1501") is None
    assert dataset_num_splits(cfg, "CUHK03") == 1  # the new protocol: one split
    cfg.DATASETS.CUHK03.CLASSIC_SPLIT = True
    assert dataset_num_splits(cfg, "CUHK03") == 20
    # training on Market, testing on VIPeR: the splits are VIPeR's
    cfg.DATASETS.NAMES = ("Market1501",)
    assert config_splits(cfg) == list(range(10))


def test_splits_refuses_data_without_splits(tmp_path, capsys):
    cfg = _cfg(tmp_path, "ZooNoSplitSet")
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.dump())
    assert splits_main(["--config-file", str(path), "--splits", "0", "1"]) == 2
    err = capsys.readouterr().err
    assert "ZooNoSplitSet" in err and "num_splits" in err
    assert not os.path.exists(tmp_path / "out")  # refused before training anything


def test_name_clash_names_both_registrations():
    class PRID(ImageDataset):  # fast-reid already registers PRID (PRID 2011)
        pass

    with pytest.raises(RegistryClashError) as info:
        DATASET_REGISTRY.register(PRID)
    message = str(info.value)
    assert "fastreid.data.datasets.prid.PRID" in message and "prid.py:" in message
    assert f"{__name__}.test_name_clash_names_both_registrations.<locals>.PRID" in message
    assert os.path.basename(__file__) in message
    assert DATASET_REGISTRY.get("PRID").__module__ == "fastreid.data.datasets.prid"
    assert isinstance(info.value, AssertionError)  # what fast-reid's own refusal raises

    own = Registry("ZOO_TEST")
    own.register(ZooNoSplitSet)
    with pytest.raises(RegistryClashError, match="ZOO_TEST registry: the name 'ZooNoSplitSet'"):
        own.register(ZooNoSplitSet)


def test_real_data_runner_takes_any_registered_dataset(tmp_path):
    import importlib.util
    import json

    from tests.helpers import REPO

    spec = importlib.util.spec_from_file_location(
        "reidzoo_benchmarks_real_data_contract", os.path.join(REPO, "benchmarks", "real_data.py")
    )
    rd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rd)
    ((argv, out),) = rd.build_commands("baseline", "ZooContractSet", 2, "/d", "L", python="py")
    opts = dict(zip(argv[5::2], argv[6::2]))
    assert opts["DATASETS.NAMES"] == opts["DATASETS.TESTS"] == '("ZooContractSet",)'
    assert opts["DATASETS.SPLIT_INDEX"] == "2" and out.endswith("split_2")
    with pytest.raises(KeyError, match="short names: .*registered names: .*ZooContractSet"):
        rd.build_commands("baseline", "NoSuchData", 0, "/d", "L")
    # its finished cells are collected after the short-named ones
    metrics = {"Rank-1": 1.0, "Rank-5": 2.0, "Rank-10": 3.0, "mAP": 4.0}
    for dataset in ("ZooContractSet", "viper"):
        path = rd.record_path(str(tmp_path), "baseline", dataset, 0)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"model": "baseline", "dataset": dataset, "split": 0, "metrics": metrics}, f)
    found = rd.load_records(str(tmp_path))
    assert [r["dataset"] for r in found] == ["viper", "ZooContractSet"]
