"""Every paper's trained checkpoint loads, with the config it was trained with, in the four tools
that use a trained model: ``train_net.py --eval-only``, ``reidzoo.extract``, ``reidzoo.export``
and ``reidzoo.visualize maps`` (one rule, :func:`reidzoo.checkpoint.load_for_inference`).

Each paper trains 2 iterations of its CI config on a tiny SyntheticReID with ``train_net.py``'s
``main``, once per module; IANet's ``--eval-only`` runs the real ``train_net.py`` in a
subprocess, given the registered model name of the config.
"""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from reidzoo.config import setup_cfg
from tests.helpers import REPO, TINY_SYNTH

# Every test here uses a paper trained through train_net.py (a module fixture per paper).
pytestmark = pytest.mark.slow

CONFIGS = {
    "IANet": ["IANet/configs/IANet_R18_synthetic_ci.yml"],
    "PAN": ["PAN/configs/PAN_R18_synthetic_ci.yml"],
    "PFE": ["PFE/configs/PFE_R18_synthetic_ci_stage1.yml",
            "PFE/configs/PFE_R18_synthetic_ci_stage2.yml"],  # stage II starts from stage I
    "PMM": ["PMM/configs/PMM_R18_synthetic_ci.yml"],
    "RMGL": ["RMGL/configs/RMGL_R18_synthetic_ci.yml"],
}  # fmt: skip
SIZE_96 = ["INPUT.SIZE_TRAIN", "[96, 32]", "INPUT.SIZE_TEST", "[96, 32]"]  # RMGL strides
# PMM: the smallest input whose map (8x4) its 8x4 block grid divides (the paper's K / 32 mixed)
SIZE_PMM = ["INPUT.SIZE_TRAIN", "[128, 64]", "INPUT.SIZE_TEST", "[128, 64]"]
SHORT = ["SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", "2",
         "TEST.EVAL_PERIOD", "2", "TEST.IMS_PER_BATCH", "16"]  # fmt: skip
NUM_TRAIN_IDS = 4  # one P x K = 4 x 2 batch of identities: the smallest set that trains
FEWER_IDS = ["DATASETS.SYNTHETIC.NUM_TRAIN_IDS", str(NUM_TRAIN_IDS),
             "DATASETS.SYNTHETIC.NUM_TEST_IDS", "4"]  # fmt: skip


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synth"))


def _train_net(argv, in_subprocess=False):
    """``train_net.py ARGV``: its ``main`` in this process, or the script in a subprocess."""
    from reidzoo.engine import default_argument_parser, main

    if not in_subprocess:
        return main(default_argument_parser().parse_args(argv))
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [sys.executable, os.path.join(REPO, "train_net.py"), *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return None


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def run(request, synth_root, tmp_path_factory):
    """One trained run of a paper: its config file, the overrides it was trained with, the
    checkpoint and the final results of the training-time evaluation."""
    paper = request.param
    tmp = tmp_path_factory.mktemp(paper.lower())
    base = TINY_SYNTH + FEWER_IDS + {"PMM": SIZE_PMM, "RMGL": SIZE_96}.get(paper, []) + SHORT
    base += ["DATASETS.ROOT", synth_root]
    weights = []
    for i, rel in enumerate(CONFIGS[paper]):
        config = os.path.join(REPO, "projects", rel)
        out = str(tmp / f"stage{i + 1}")
        _train_net(["--config-file", config, *base, *weights, "OUTPUT_DIR", out])
        weights = ["MODEL.WEIGHTS", os.path.join(out, "model_final.pth")]
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)["results"]
    yield {"paper": paper, "config": config, "opts": base, "ckpt": weights[1], "tmp": tmp,
           "results": results}  # fmt: skip
    shutil.rmtree(tmp, ignore_errors=True)  # the next paper's run does not need this one's disk


def _reference_model(run):
    """The trained model loaded by hand: built with the trained number of classes and loaded
    with torch's own strict ``load_state_dict`` (not reidzoo's loader)."""
    from fastreid.modeling.meta_arch import build_model

    cfg = setup_cfg(run["config"], run["opts"] + ["MODEL.HEADS.NUM_CLASSES", str(NUM_TRAIN_IDS)])
    model = build_model(cfg)
    state = torch.load(run["ckpt"], map_location="cpu", weights_only=True)["model"]
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg


def _query_images(run, n=4):
    from reidzoo.data.build import build_dataset

    cfg = setup_cfg(run["config"], run["opts"])
    return [item[0] for item in build_dataset(cfg, "SyntheticReID").query[:n]]


class _Records(logging.Handler):
    """Every record of the checkpoint loggers (fast-reid's does not propagate to the root)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def load_log():
    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("fastreid.utils.checkpoint", "reidzoo.checkpoint")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield handler.records
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


def test_eval_only_reproduces_the_training_evaluation(run):
    out = str(run["tmp"] / "eval")
    # IANet: the real script, and the config given by its registered model name
    cli = run["paper"] == "IANet"
    config = "ianet-synthetic-ci" if cli else run["config"]
    argv = ["--config-file", config, "--eval-only", *run["opts"], "OUTPUT_DIR", out,
            "MODEL.WEIGHTS", run["ckpt"]]  # fmt: skip
    _train_net(argv, in_subprocess=cli)
    with open(os.path.join(out, "results_eval.json")) as f:
        results = json.load(f)["results"]
    for metric in ("Rank-1", "mAP", "mINP"):
        assert results[metric] == pytest.approx(run["results"][metric], abs=1e-4), metric


def test_extract_gives_the_trained_model_features(run, load_log):
    from reidzoo import extract

    images = _query_images(run)
    npz = str(run["tmp"] / "feats.npz")
    argv = ["--config-file", run["config"], "--checkpoint", run["ckpt"], "--output", npz,
            "--no-normalize", "--no-flip", *sum((["--input", p] for p in images), []),
            *run["opts"]]  # fmt: skip
    assert extract.main(argv) == 0
    data = extract.load_features(npz)
    assert data["names"] == images
    # the model loaded by hand, on the evaluation's test transforms
    from reidzoo.data.transforms import build_transforms_with_registry
    from reidzoo.inference import to_pil

    model, cfg = _reference_model(run)
    transforms = build_transforms_with_registry(cfg, is_train=False)
    batch = torch.stack([transforms(to_pil(p)) for p in images])
    with torch.no_grad():
        expected = model({"images": batch}).numpy()
    np.testing.assert_allclose(data["features"], expected, rtol=0, atol=1e-4)
    # the classifier the config does not size: said once, quietly; nothing skipped or warned
    said = [r for r in load_log if "not needed for features" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO, [r.getMessage() for r in said]
    loud = [r.getMessage() for r in load_log if r.levelno >= logging.WARNING]
    if run["paper"] != "PFE":  # PFE stage II's config loads non-strictly (its README)
        assert not loud, loud
    assert not [m for m in loud if "Skip loading" in m], loud


def test_export_holds_the_trained_weights(run, capsys):
    import onnxruntime as ort

    from reidzoo import export

    onnx_file = str(run["tmp"] / "model.onnx")
    argv = ["--config-file", run["config"], "--checkpoint", run["ckpt"], "--output", onnx_file,
            *run["opts"]]  # fmt: skip
    assert export.main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("parity ") and float(last.rsplit("rel=", 1)[1]) <= 1e-4, last
    model, cfg = _reference_model(run)
    images = export.example_images(3, cfg.INPUT.SIZE_TEST, seed=5)
    session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    (got,) = session.run(["features"], {"images": images.numpy()})
    with torch.no_grad():
        expected = model(images).numpy()
    scale = float(np.abs(expected).max())
    assert np.abs(got - expected).max() <= 1e-4 * scale


def test_maps_draw_the_trained_model(run, capsys):
    from reidzoo.visualize import maps

    out = str(run["tmp"] / "maps")
    image = _query_images(run, n=1)[0]
    argv = ["--config-file", run["config"], "--checkpoint", run["ckpt"], "--input", image,
            "--output", out, *run["opts"]]  # fmt: skip
    assert maps.main(argv) == 0
    written = capsys.readouterr().out.split()
    tag = run["paper"].lower()
    ours = [p for p in written if f"_{tag}_" in os.path.basename(p)]
    assert ours and all(os.path.getsize(p) > 0 for p in ours), written
    if run["paper"] == "PMM":  # Grad-CAM needs the stage classifiers: they were loaded
        assert any(p.endswith("_pmm_gradcam.png") for p in ours), ours
