"""Learning-rate schedules: absolute STEPS, warmup included, cosine over the post-warmup span,
read from what the real trainer logged (its hooks), and from ``python -m reidzoo.schedule``."""

import json
import math
import os
import subprocess
import sys

import pytest

from reidzoo.engine import ReidTrainer
from tests.helpers import REPO, tiny_cfg

BASE = 1e-3


def _warm(it, warmup, factor=0.1):
    return 1.0 if it >= warmup else factor * (1 - it / warmup) + it / warmup


def _train_and_read_lrs(root, out, **overrides):
    """Train with the real trainer (hooks included) and return the ``lr`` it logged per
    iteration in metrics.json, and the trainer."""
    cfg = tiny_cfg(root, out, **{"REIDZOO.LOG_PERIOD": 1, "TEST.EVAL_PERIOD": 1000, **overrides})
    trainer = ReidTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    lrs = {}
    with open(os.path.join(out, "metrics.json")) as f:
        for line in f:
            rec = json.loads(line)
            if "lr" in rec:
                lrs[rec["iteration"]] = rec["lr"]
    return [lrs[i] for i in sorted(lrs)], trainer


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["iter", "epoch"])
def test_multistep_milestones_are_absolute_with_warmup(tiny_market, tmp_path, mode):
    # tiny_market: 24 training images, batch 8 -> 3 iterations per epoch
    if mode == "iter":
        over = {"SOLVER.MAX_ITER": 12, "SOLVER.STEPS": [6, 10], "SOLVER.WARMUP_ITERS": 3}
        unit = lambda it: it  # noqa: E731
        total = 12
    else:
        over = {"SOLVER.MAX_EPOCH": 5, "SOLVER.STEPS": [2, 4], "SOLVER.WARMUP_ITERS": 4}
        unit = lambda it: it // 3  # noqa: E731
        total = 15
    over.update({"SOLVER.GAMMA": 0.1, "SOLVER.WARMUP_FACTOR": 0.1, "SOLVER.SCHED": "MultiStepLR"})
    lrs, trainer = _train_and_read_lrs(tiny_market, str(tmp_path / mode), **over)
    assert len(lrs) == total
    steps = over["SOLVER.STEPS"]
    expected = [
        BASE * _warm(it, over["SOLVER.WARMUP_ITERS"]) * 0.1 ** sum(m <= unit(it) for m in steps)
        for it in range(total)
    ]
    assert lrs == pytest.approx(expected, rel=1e-9)
    # the first drop is at the milestone itself, not warmup-shifted as in stock fast-reid
    first_drop = next(it for it in range(1, total) if lrs[it] < lrs[it - 1] * 0.5)
    assert unit(first_drop) == steps[0]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["iter", "epoch"])
def test_cosine_anneals_over_the_post_warmup_span(tiny_market, tmp_path, mode):
    eta = 1e-5
    if mode == "iter":
        over = {"SOLVER.MAX_ITER": 12, "SOLVER.WARMUP_ITERS": 3}
        unit, start, span, total = (lambda it: it), 3, 9, 12
    else:
        over = {"SOLVER.MAX_EPOCH": 5, "SOLVER.WARMUP_ITERS": 4}  # warmup ends in epoch 1
        unit, start, span, total = (lambda it: it // 3), 2, 3, 15
    over.update({"SOLVER.SCHED": "CosineAnnealingLR", "SOLVER.ETA_MIN_LR": eta})
    lrs, trainer = _train_and_read_lrs(tiny_market, str(tmp_path / mode), **over)
    assert len(lrs) == total
    warmup = over["SOLVER.WARMUP_ITERS"]

    def expected(it):
        u = unit(it)
        main = 1.0 if u < start else (1 + math.cos(math.pi * (u - start) / span)) / 2
        return (
            (eta + (BASE - eta) * main) * _warm(it, warmup)
            if u >= start
            else BASE * _warm(it, warmup)
        )

    assert lrs == pytest.approx([expected(it) for it in range(total)], rel=1e-9)
    after = lrs[warmup:]
    assert all(b <= a for a, b in zip(after, after[1:])), "the rate climbed back up"
    assert lrs[-1] < 0.5 * BASE
    # and it reaches ETA_MIN_LR exactly when training ends
    assert trainer.scheduler["lr_sched"].get_last_lr()[0] == pytest.approx(eta, rel=1e-9)


def _schedule_cli(*args):
    r = subprocess.run(
        [sys.executable, "-m", "reidzoo.schedule", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()


@pytest.mark.slow
def test_schedule_cli_demo_iteration_mode():
    lines = _schedule_cli(
        "--config-file",
        "configs/Demo/bagtricks_R18_synthetic.yml",
        "SOLVER.MAX_ITER",
        "30",
        "SOLVER.STEPS",
        "[15, 25]",
        "SOLVER.WARMUP_ITERS",
        "5",
    )
    table = json.loads(lines[-1])
    assert table["unit"] == "iter"
    lr = {int(k): v for k, v in table["lr"].items()}
    assert lr[0] == pytest.approx(1e-4)  # WARMUP_FACTOR 0.1 x BASE_LR 1e-3
    assert lr[5] == pytest.approx(1e-3)
    assert [k for k in lr if k > 5] == [15, 25]
    assert lr[15] == pytest.approx(1e-4) and lr[25] == pytest.approx(1e-5)
    assert "iter 15: lr 0.0001" in lines


@pytest.mark.slow
def test_schedule_cli_matches_what_the_trainer_logs(tiny_market, tmp_path):
    over = {
        "SOLVER.MAX_EPOCH": 4,
        "SOLVER.STEPS": [1, 3],
        "SOLVER.WARMUP_ITERS": 2,
        "SOLVER.SCHED": "MultiStepLR",
    }
    lrs, trainer = _train_and_read_lrs(tiny_market, str(tmp_path / "run"), **over)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(trainer.cfg.dump())
    lines = _schedule_cli("--config-file", str(cfg_file), "--iters-per-epoch", "3")
    table = json.loads(lines[-1])
    assert table["unit"] == "epoch"
    logged = {e: lrs[e * 3] for e in range(4)}  # the rate at each epoch's first iteration
    changes = {0: logged[0]}
    changes.update({e: logged[e] for e in range(1, 4) if logged[e] != logged[e - 1]})
    assert {int(k): v for k, v in table["lr"].items()} == pytest.approx(changes, rel=1e-9)
    # without --iters-per-epoch the tool counts the training set itself (24 images / 8)
    lines2 = _schedule_cli("--config-file", str(cfg_file))
    assert json.loads(lines2[-1]) == table


def test_schedule_rejects_unknown_scheduler(tiny_market, tmp_path):
    cfg = tiny_cfg(tiny_market, str(tmp_path), **{"SOLVER.SCHED": "StepLR"})
    with pytest.raises(ValueError, match="SOLVER.SCHED 'StepLR'"):
        ReidTrainer(cfg)


def test_resumed_schedule_keeps_the_configs_schedule_and_the_checkpoints_position(caplog):
    import torch

    from reidzoo.schedule import AbsoluteLR

    def make(total):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE)
        kw = dict(sched="MultiStepLR", iters_per_epoch=2, milestones=[2], gamma=0.1)
        return AbsoluteLR(opt, total_units=total, **kw)

    old = make(4)
    for _ in range(5):
        old.optimizer.step()
        old.step()
    new = make(8)  # resumed with more epochs
    new.load_state_dict(old.state_dict())
    assert new.last_epoch == 5 and new.total_units == 8
    assert "another schedule than the checkpoint's" in caplog.text
    assert new.get_last_lr() == pytest.approx([BASE * 0.1])
    with pytest.raises(ValueError, match="written by another scheduler"):
        new.load_state_dict({"milestones": {2: 1}, "last_epoch": 3})
