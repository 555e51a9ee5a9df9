"""The example plugin package (examples/reidzoo-example-dataset): installed into a throwaway
environment, found through its ``reidzoo.plugins`` entry point, its config values and split
index reach its dataset, and ``python -m reidzoo.splits`` trains and evaluates it."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO, bare_venv, purelib, site_packages

# pip-installs the example plugin into a throwaway venv, then trains on it.
pytestmark = pytest.mark.slow

EXAMPLE = os.path.join(REPO, "examples", "reidzoo-example-dataset")

CONFIG = """
MODEL:
  DEVICE: cpu
  BACKBONE: {{NAME: build_staged_resnet_backbone, DEPTH: 18x, FEAT_DIM: 512, PRETRAIN: False}}
  HEADS: {{NAME: EmbeddingHead, NECK_FEAT: before, POOL_LAYER: GlobalAvgPool, CLS_LAYER: Linear}}
  LOSSES: {{NAME: [CrossEntropyLoss, TripletLoss]}}
INPUT: {{SIZE_TRAIN: [64, 32], SIZE_TEST: [64, 32]}}
DATASETS:
  NAMES: [ExampleFolderReID]
  TESTS: [ExampleFolderReID]
  ROOT: {root}
  EXAMPLE_FOLDER: {{QUERY_CAMERA: 2}}
DATALOADER: {{SAMPLER_TRAIN: NaiveIdentitySampler, NUM_INSTANCE: 2, NUM_WORKERS: 0}}
SOLVER:
  OPT: Adam
  BASE_LR: 0.001
  IMS_PER_BATCH: 8
  MAX_ITER: 3
  WARMUP_ITERS: 0
  STEPS: [100]
  CHECKPOINT_PERIOD: 100
TEST: {{EVAL_PERIOD: 100, IMS_PER_BATCH: 16}}
OUTPUT_DIR: {output}
REIDZOO: {{SEED: 0}}
"""

PROBE = """
import importlib.metadata as m, json, sys
from reidzoo.config import setup_cfg
from reidzoo.data.build import build_dataset
eps = {e.name: e.value for e in m.entry_points(group="reidzoo.plugins")}
out = {"entry_point": eps.get("example_dataset")}
for k in (0, 1):
    cfg = setup_cfg(sys.argv[1], ["DATASETS.SPLIT_INDEX", str(k)])
    d = build_dataset(cfg, "ExampleFolderReID")
    out[k] = {
        "cls": type(d).__module__,
        "test_ids": d.test_ids,
        "query_cams": sorted({c for _, _, c in d.query}),
        "train_ids": sorted({p for _, p, _ in d.train}),
    }
print(json.dumps(out))
"""


def _venv_seeing_this_env(path):
    """A venv whose interpreter also sees this environment's packages, editable reidzoo
    included, and installs into its own site-packages: helpers' bare venv plus a .pth
    that runs ``site.addsitedir`` on this environment's site-packages, which processes the .pth
    files there (the editable install's among them)."""
    py = bare_venv(path)
    with open(os.path.join(purelib(py), "zz_parent_env_processed.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({site_packages()!r})\n")
    return py


def _folders(root, ids=9, cams=(1, 2, 3), per_cam=2):
    """``<root>/example_folder_reid/<pid>/c<cam>_<k>.png``: one colour per identity (three
    cameras, so that every split's gallery has the 10 images a rank-10 CMC needs)."""
    rng = np.random.default_rng(0)
    for pid in range(1, ids + 1):
        folder = os.path.join(root, "example_folder_reid", f"{pid:04d}")
        os.makedirs(folder)
        colour = rng.integers(0, 255, 3)
        for cam in cams:
            for k in range(per_cam):
                img = np.clip(colour + rng.normal(0, 15, (64, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(folder, f"c{cam}_{k:03d}.png"))


def _run(cmd, cwd):
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return r.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("example_plugin")
    src = tmp / "src"  # pip builds in the source folder: keep the repository's copy clean
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    py = _venv_seeing_this_env(tmp / "venv")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "--python", py]
    _run(pip + ["install", "--no-deps", "--no-build-isolation", str(src)], str(tmp))
    root, output = tmp / "data", tmp / "out"
    _folders(str(root))
    cfg = tmp / "example.yaml"
    cfg.write_text(CONFIG.format(root=root, output=output))
    yield py, str(cfg), str(output), tmp
    shutil.rmtree(tmp, ignore_errors=True)


def test_entry_point_config_values_and_splits_reach_the_dataset(installed):
    py, cfg, _, tmp = installed
    from importlib import metadata

    here = [e.name for e in metadata.entry_points(group="reidzoo.plugins")]
    assert "example_dataset" not in here  # only the throwaway environment has it
    out = json.loads(_run([py, "-c", PROBE, cfg], str(tmp)).strip().splitlines()[-1])
    assert out["entry_point"] == "reidzoo_example_dataset"
    split0, split1 = out["0"], out["1"]
    assert split0["cls"] == split1["cls"] == "reidzoo_example_dataset.dataset"
    # DATASETS.SPLIT_INDEX reaches it: identities ranked 0, 2, 4, ... are tested in split 0
    assert split0["test_ids"] == [1, 3, 5, 7, 9] and split1["test_ids"] == [2, 4, 6, 8]
    assert split0["train_ids"] == [f"examplefolder_{p}" for p in (2, 4, 6, 8)]
    # its own config value (from_config) reaches it
    assert split0["query_cams"] == split1["query_cams"] == [2]
    # named only as a dataset (no key of its own in the config), the plugin is found too
    probe = (
        "import sys; from reidzoo.config import get_cfg; "
        "from reidzoo.data.datasets import dataset_num_splits; cfg = get_cfg(); "
        "assert 'EXAMPLE_FOLDER' not in cfg.DATASETS; "
        "print(dataset_num_splits(cfg, 'ExampleFolderReID'), sorted(sys.modules).count("
        "'reidzoo_example_dataset'))"
    )
    assert _run([py, "-c", probe], str(tmp)).split()[-2:] == ["2", "1"]


def test_splits_trains_every_split_of_the_plugin_dataset(installed):
    py, cfg, output, tmp = installed
    _run([py, "-m", "reidzoo.splits", "--config-file", cfg], str(tmp))
    data = json.load(open(os.path.join(output, "splits.json")))
    assert data["splits"] == [0, 1]  # num_splits of the dataset, no --splits needed
    for k, classes in ((0, 4), (1, 5)):
        run = os.path.join(output, f"split_{k}")
        assert os.path.isfile(os.path.join(run, "model_final.pth"))
        with open(os.path.join(run, "metrics.json")) as f:
            iters = [json.loads(line) for line in f if line.strip()]
        losses = [r["total_loss"] for r in iters if "total_loss" in r]
        assert len(losses) == 3 and all(np.isfinite(losses))
        # the classifier is sized from the split's training identities
        import yaml

        dumped = yaml.safe_load(open(os.path.join(run, "config.yaml")))
        assert dumped["MODEL"]["HEADS"]["NUM_CLASSES"] == classes
        assert dumped["DATASETS"]["SPLIT_INDEX"] == k
    assert data["summary"]["mAP"]["n"] == 2
