"""The trainer learns, checkpoints atomically, resumes, evaluates and runs data-parallel."""

import json
import os
import subprocess
import sys

import pytest
import torch

from reidzoo.engine import ReidTrainer
from tests.conftest import REPO, fix_batch, run_steps, tiny_cfg


def _fixed_batch_steps(trainer, steps):
    fix_batch(trainer)
    return run_steps(trainer, steps)[0]


def test_learning_every_group_changes_and_loss_drops(tiny_market, tmp_path):
    """Would have caught fast-reid's ContiguousParams bug: the weights must really move."""
    torch.manual_seed(0)
    trainer = ReidTrainer(tiny_cfg(tiny_market, str(tmp_path)))
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = _fixed_batch_steps(trainer, 8)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            assert not torch.equal(before[n], p.detach()), f"parameter {n} never changed"
    assert losses[-1] < 0.7 * losses[0], losses


def test_stock_contiguous_optimizer_does_not_learn(tiny_market, tmp_path):
    """What the optimizer fix prevents: fast-reid's default steps a copy of the weights."""
    from fastreid.solver import build_optimizer

    torch.manual_seed(0)
    trainer = ReidTrainer(tiny_cfg(tiny_market, str(tmp_path)))
    model = trainer.model
    optimizer, wrapper = build_optimizer(trainer.cfg, model, contiguous=True)
    batch = next(iter(trainer.data_loader))
    w0 = model.backbone.conv1.weight.detach().clone()
    model.train()
    for _ in range(3):
        loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if torch.equal(w0, model.backbone.conv1.weight.detach()):
        return  # the bug as described: nothing moved
    pytest.skip("this torch version steps the model's own weights even with ContiguousParams")


def test_cpu_amp_turned_off(tiny_market, tmp_path, caplog):
    cfg = tiny_cfg(tiny_market, str(tmp_path), **{"SOLVER.AMP.ENABLED": True})
    from reidzoo.engine import prepare_cfg

    out = prepare_cfg(cfg)
    assert out.SOLVER.AMP.ENABLED is False
    assert cfg.SOLVER.AMP.ENABLED is True  # caller's config untouched
    assert "AMP turned off" in caplog.text


def test_iteration_schedule(tiny_market, tmp_path):
    cfg = tiny_cfg(
        tiny_market,
        str(tmp_path),
        **{"SOLVER.MAX_ITER": 5, "SOLVER.STEPS": [2, 4], "SOLVER.GAMMA": 0.1},
    )
    trainer = ReidTrainer(cfg)
    assert trainer.max_iter == 5 and trainer.iters_per_epoch == 1
    lrs = []
    for _ in range(5):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.scheduler["lr_sched"].step()
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5])


def test_test_loader_honours_num_workers(tiny_market, tmp_path):
    cfg = tiny_cfg(tiny_market, str(tmp_path), **{"DATALOADER.NUM_WORKERS": 0})
    loader, num_query = ReidTrainer.build_test_loader(cfg, "Market1501")
    assert loader.num_workers == 0  # fast-reid's builder hard-codes 4
    assert num_query == 6


def test_train_checkpoint_resume_and_eval(tiny_market, tmp_path):
    out = str(tmp_path / "run")
    cfg = tiny_cfg(tiny_market, out, **{"SOLVER.MAX_EPOCH": 2, "TEST.EVAL_PERIOD": 2})
    trainer = ReidTrainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    assert {"Rank-1", "mAP", "mINP"} <= set(results)
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read() == "model_final.pth"
    # resume: nothing left to do, starts after the last saved epoch
    cfg2 = tiny_cfg(tiny_market, out, **{"SOLVER.MAX_EPOCH": 3, "TEST.EVAL_PERIOD": 3})
    t2 = ReidTrainer(cfg2)
    t2.resume_or_load(resume=True)
    assert t2.start_epoch == 2
    state = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)
    for k, v in state["model"].items():
        assert torch.equal(t2.model.state_dict()[k], v), k


def test_atomic_checkpoint_survives_crash(tiny_market, tmp_path, monkeypatch):
    from reidzoo import checkpoint as ck

    out = str(tmp_path)
    trainer = ReidTrainer(tiny_cfg(tiny_market, out))
    trainer.checkpointer.save("model_0000", epoch=0)
    good = open(os.path.join(out, "model_0000.pth"), "rb").read()

    def broken_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.checkpointer.save("model_0000", epoch=1)
    assert open(os.path.join(out, "model_0000.pth"), "rb").read() == good
    assert open(os.path.join(out, "last_checkpoint")).read() == "model_0000.pth"
    assert [f for f in os.listdir(out) if f.startswith(".tmp-")] == []


def _run_train_net(args, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "train_net.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
    )


def _write_cfg(cfg, path):
    with open(path, "w") as f:
        f.write(cfg.dump())
    return str(path)


def test_killed_run_resumes_from_last_checkpoint(tiny_market, tmp_path):
    """SIGKILL mid-run, then --resume: continues after the last complete checkpoint."""
    out = str(tmp_path / "run")
    cfg = tiny_cfg(tiny_market, out, **{"SOLVER.MAX_EPOCH": 40, "TEST.EVAL_PERIOD": 1000})
    cfg_file = _write_cfg(cfg, tmp_path / "cfg.yaml")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "train_net.py", "--config-file", cfg_file],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import time

    deadline = time.time() + 300
    while time.time() < deadline:
        if os.path.exists(os.path.join(out, "model_0001.pth")):
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    last = open(os.path.join(out, "last_checkpoint")).read()
    ckpt = torch.load(os.path.join(out, last), weights_only=False)  # loads: not corrupt
    cfg2 = tiny_cfg(tiny_market, out, **{"SOLVER.MAX_EPOCH": 40})
    t2 = ReidTrainer(cfg2)
    t2.resume_or_load(resume=True)
    assert t2.start_epoch == ckpt["epoch"] + 1 >= 2


def test_train_net_cli_train_then_eval_only(tiny_market, tmp_path):
    out = str(tmp_path / "run")
    cfg = tiny_cfg(tiny_market, out, **{"SOLVER.MAX_EPOCH": 1, "TEST.EVAL_PERIOD": 1})
    cfg_file = _write_cfg(cfg, tmp_path / "cfg.yaml")
    r = _run_train_net(["--config-file", cfg_file])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mAP" in r.stdout + r.stderr
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    assert metrics and all("total_loss" in m for m in metrics)
    with open(os.path.join(out, "results.json")) as f:
        assert 0 <= json.load(f)["results"]["mAP"] <= 100
    r = _run_train_net(
        ["--config-file", cfg_file, "--eval-only", "MODEL.WEIGHTS", f"{out}/model_final.pth"]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Rank-1" in r.stdout + r.stderr


def test_eval_only_rejects_checkpoint_of_another_model(tiny_market, tmp_path):
    out = str(tmp_path / "run")
    cfg = tiny_cfg(tiny_market, out)
    model = ReidTrainer.build_model(tiny_cfg(tiny_market, out, **{"MODEL.HEADS.NUM_CLASSES": 6}))
    os.makedirs(out, exist_ok=True)
    torch.save({"model": model.state_dict()}, os.path.join(out, "other.pth"))
    cfg_file = _write_cfg(cfg, tmp_path / "cfg.yaml")
    r = _run_train_net(
        [
            "--config-file",
            cfg_file,
            "--eval-only",
            "MODEL.WEIGHTS",
            f"{out}/other.pth",
            "MODEL.BACKBONE.DEPTH",
            "34x",
        ]
    )
    assert r.returncode != 0
    assert "does not match the model" in r.stderr
    assert "missing keys" in r.stderr and "backbone.layer1.2.conv1.weight" in r.stderr


def test_two_cpu_processes_end_with_identical_weights(tiny_market, tmp_path):
    out = str(tmp_path / "ddp")
    cfg = tiny_cfg(
        tiny_market, out, **{"SOLVER.MAX_ITER": 3, "TEST.EVAL_PERIOD": 3, "SOLVER.IMS_PER_BATCH": 8}
    )
    cfg_file = _write_cfg(cfg, tmp_path / "cfg.yaml")
    script = tmp_path / "ddp_check.py"
    script.write_text(
        "import sys, torch\n"
        "from fastreid.utils import comm\n"
        "from reidzoo.engine import default_argument_parser, launch, setup, ReidTrainer\n"
        "def run(args):\n"
        "    cfg = setup(args)\n"
        "    t = ReidTrainer(cfg)\n"
        "    t.resume_or_load(resume=False)\n"
        "    t.train()\n"
        "    sd = t.model.module.state_dict()\n"
        f"    torch.save(sd, r'{out}/rank%d.pt' % comm.get_rank())\n"
        "    assert comm.get_world_size() == 2\n"
        "if __name__ == '__main__':\n"
        "    a = default_argument_parser().parse_args()\n"
        "    launch(run, a.num_gpus, dist_url='auto', args=(a,))\n"
    )
    r = subprocess.run(
        [sys.executable, str(script), "--num-gpus", "2", "--config-file", cfg_file],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    a = torch.load(f"{out}/rank0.pt")
    b = torch.load(f"{out}/rank1.pt")
    init = ReidTrainer.build_model(tiny_cfg(tiny_market, out, **{"MODEL.HEADS.NUM_CLASSES": 6}))
    assert set(a) == set(b)
    # Parameters are identical; BN running statistics stay per rank, as in fast-reid
    # (broadcast_buffers=False) and rank 0's are the ones checkpointed.
    params = [n for n, _ in init.named_parameters()]
    for k in params:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], init.state_dict()[k]) for k in params)


def test_dataset_root_from_config_or_environment(tmp_path, monkeypatch, tiny_market):
    from reidzoo.config import dataset_root
    from reidzoo.engine import build_dataset

    cfg = tiny_cfg("", str(tmp_path))
    monkeypatch.setenv("FASTREID_DATASETS", tiny_market)
    assert dataset_root(cfg) == tiny_market
    assert len(build_dataset(cfg, "Market1501").query) == 6  # fast-reid's loader via the env
    cfg.DATASETS.ROOT = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere.*Market-1501-v15.09.15"):
        build_dataset(cfg, "Market1501")
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg.DATASETS.ROOT = str(empty)
    with pytest.raises(FileNotFoundError, match="empty"):
        build_dataset(cfg, "Market1501")
