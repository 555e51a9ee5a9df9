"""Running one config over several seeded splits and summarising mean +- std."""

import json
import os

import numpy as np
from PIL import Image

from reidzoo.splits import main
from tests.helpers import tiny_cfg


def _fake_viper(root, ids=8):
    folder = os.path.join(root, "viper")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for pid in range(1, ids + 1):
        colour = rng.integers(0, 255, 3)
        for cam in (1, 2):
            img = np.clip(colour + rng.normal(0, 15, (64, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(folder, f"{pid:04d}{cam:04d}.png"))
    return root


def test_two_splits_mean_std(tmp_path, capsys):
    root = _fake_viper(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    cfg = tiny_cfg(root, out, **{"SOLVER.MAX_EPOCH": 1, "TEST.EVAL_PERIOD": 1})
    cfg.DATASETS.NAMES = ("VIPeRSingleShot",)
    cfg.DATASETS.TESTS = ("VIPeRSingleShot",)
    cfg.DATALOADER.NUM_INSTANCE = 2
    cfg.SOLVER.IMS_PER_BATCH = 4
    path = tmp_path / "cfg.yaml"
    path.write_text(cfg.dump())
    assert main(["--config-file", str(path), "--splits", "0", "1"]) == 0
    printed = capsys.readouterr().out
    data = json.load(open(os.path.join(out, "splits.json")))
    r1 = [s["Rank-1"] for s in data["per_split"]]
    assert data["splits"] == [0, 1] and len(r1) == 2
    assert data["summary"]["Rank-1"]["mean"] == np.mean(r1)
    assert abs(data["summary"]["Rank-1"]["std"] - np.std(r1, ddof=1)) < 1e-9
    assert "Rank-1:" in printed and "(n=2)" in printed
    assert os.path.isfile(os.path.join(out, "split_0", "model_final.pth"))
    assert os.path.isfile(os.path.join(out, "split_1", "results.json"))
