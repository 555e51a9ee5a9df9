"""Exact resume, protected run folders and finished runs, through the real train_net.py."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import REPO, tiny_cfg

# Every test runs train_net.py in subprocesses (train, kill, resume, refuse).
pytestmark = pytest.mark.slow

# Random augmentations on, so that a replayed or shifted data stream would show.
AUGMENTED = {
    "INPUT.FLIP.ENABLED": True,
    "INPUT.PADDING.ENABLED": True,
    "INPUT.PADDING.SIZE": 4,
    "INPUT.REA.ENABLED": True,
    "INPUT.REA.PROB": 0.5,
    "REIDZOO.LOG_PERIOD": 1,
}


def _cfg_file(tiny_market, tmp_path, name, **over):
    cfg = tiny_cfg(tiny_market, str(tmp_path / name), **{**AUGMENTED, **over})
    path = tmp_path / f"{name}.yaml"
    path.write_text(cfg.dump())
    return str(path), str(tmp_path / name)


def _train_net(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "train_net.py", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def _kill_when(cfg_file, out, ready, timeout=300):
    """Start train_net.py and SIGKILL it (by PID) once ``ready(out)`` holds."""
    proc = subprocess.Popen(
        [sys.executable, "train_net.py", "--config-file", cfg_file],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None and not ready(out):
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _metrics(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def _model(out, name="model_final.pth"):
    return torch.load(os.path.join(out, name), map_location="cpu", weights_only=True)


def _assert_bit_identical(a, b):
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in sa:
            if torch.is_tensor(sa[k]):
                assert torch.equal(sa[k], sb[k]), f"optimizer state {k} differs"


def _mid_epoch_after(k):
    """Ready once checkpoint model_<k> exists and the next iteration has been logged."""

    def ready(out):
        if not os.path.exists(os.path.join(out, f"model_{k:04d}.pth")):
            return False
        try:
            return any(m.get("iteration", -1) > (k + 1) * 3 for m in _metrics(out))
        except (OSError, ValueError):
            return False

    return ready


def test_killed_and_resumed_run_is_bit_identical(tiny_market, tmp_path):
    """Epoch mode with a data-loader worker (the iteration-mode test below loads in-process)."""
    over = {
        "SOLVER.MAX_EPOCH": 5,  # 3 iterations per epoch
        "SOLVER.CHECKPOINT_PERIOD": 1,
        "TEST.EVAL_PERIOD": 2,
        "DATALOADER.NUM_WORKERS": 1,
    }
    ref_cfg, ref = _cfg_file(tiny_market, tmp_path, "ref", **over)
    r = _train_net("--config-file", ref_cfg)
    assert r.returncode == 0, r.stderr[-3000:]

    cfg, out = _cfg_file(tiny_market, tmp_path, "killed", **over)
    _kill_when(cfg, out, _mid_epoch_after(1))  # killed inside epoch 2 (or later)
    last = open(os.path.join(out, "last_checkpoint")).read()
    assert last.startswith("model_0") and last != "model_final.pth"
    # a temporary file left by a killed checkpoint write
    stale = os.path.join(out, ".tmp-abc123model_0002.pth")
    with open(stale, "wb") as f:
        f.write(b"half a checkpoint")

    r = _train_net("--config-file", cfg, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert not os.path.exists(stale)
    _assert_bit_identical(_model(ref), _model(out))

    # metrics.json holds every iteration once, with the uninterrupted run's values
    def by_iter(rows):
        keyed = {}
        for m in rows:
            assert m["iteration"] not in keyed or set(m) & set(keyed[m["iteration"]]) == {
                "iteration"
            }, f"iteration {m['iteration']} written twice"
            keyed.setdefault(m["iteration"], {}).update(m)
        return keyed

    ref_rows, rows = by_iter(_metrics(ref)), by_iter(_metrics(out))
    assert sorted(rows) == sorted(ref_rows)
    # (losses in metrics.json are medians over the last 20 iterations, whose window restarts
    # at a resume; the weights above are the exact check)
    for it in ref_rows:
        for k in ("lr", "Rank-1", "mAP", "mINP"):
            if k in ref_rows[it]:
                assert rows[it][k] == ref_rows[it][k], (it, k)
    with open(os.path.join(ref, "results.json")) as f, open(os.path.join(out, "results.json")) as g:
        assert json.load(f)["results"] == json.load(g)["results"]


def test_iteration_mode_resume_is_bit_identical(tiny_market, tmp_path):
    over = {"SOLVER.MAX_ITER": 10, "SOLVER.CHECKPOINT_PERIOD": 3, "TEST.EVAL_PERIOD": 100}
    ref_cfg, ref = _cfg_file(tiny_market, tmp_path, "ref", **over)
    assert _train_net("--config-file", ref_cfg).returncode == 0
    cfg, out = _cfg_file(tiny_market, tmp_path, "killed", **over)

    def ready(o):
        return os.path.exists(os.path.join(o, "model_0005.pth"))

    _kill_when(cfg, out, ready)
    r = _train_net("--config-file", cfg, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_bit_identical(_model(ref), _model(out))


def _hashes(folder):
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_run_folder_is_protected_and_finished_run_says_so(tiny_market, tmp_path):
    cfg, out = _cfg_file(tiny_market, tmp_path, "run", **{"SOLVER.MAX_EPOCH": 1})
    assert _train_net("--config-file", cfg).returncode == 0
    before = _hashes(out)
    assert {"model_final.pth", "metrics.json", "results.json", "config.yaml"} <= set(before)

    # a new run into the same folder is refused, and nothing of the old run is touched
    r = _train_net("--config-file", cfg)
    assert r.returncode != 0
    assert os.path.abspath(out) in r.stderr and "already holds a run" in r.stderr
    assert "--resume" in r.stderr and "--overwrite" in r.stderr
    assert _hashes(out) == before

    # --resume of the finished run: says so, names the checkpoint, changes nothing
    r = _train_net("--config-file", cfg, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    text = r.stdout + r.stderr
    assert "is finished" in text and "model_final.pth" in text
    assert "AttributeError" not in text
    after = _hashes(out)
    for name in ("model_final.pth", "metrics.json", "results.json"):
        assert after[name] == before[name], name

    # --eval-only into the folder keeps the training run's config.yaml
    r = _train_net(
        "--config-file", cfg, "--eval-only", "MODEL.WEIGHTS", os.path.join(out, "model_final.pth")
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert _hashes(out)["config.yaml"] == before["config.yaml"]
    assert os.path.isfile(os.path.join(out, "config_eval.yaml"))

    # --overwrite moves the old run aside (byte for byte) and starts a new one
    before = _hashes(out)
    r = _train_net("--config-file", cfg, "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    moved = [p for p in os.listdir(tmp_path) if p.startswith("run.replaced-")]
    assert len(moved) == 1
    assert _hashes(tmp_path / moved[0]) == before
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
