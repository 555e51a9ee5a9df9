"""The trainer learns, checkpoints atomically, resumes, evaluates and runs data-parallel."""

import json
import os
import subprocess
import sys

import pytest
import torch

from reidzoo.engine import ReidTrainer
from tests.helpers import REPO, fix_batch, run_steps, tiny_cfg


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
    """What the optimizer fix prevents: with fast-reid's own default (``contiguous=True``, kept
    in ``compat.ORIGINALS``) the optimizer steps a flat copy and no weight of the model moves;
    with the default ``reidzoo.compat`` installs, the same steps move every trained weight."""
    from fastreid.solver import build_optimizer

    from reidzoo import compat

    stock = compat.ORIGINALS["optimizer_contiguous"]
    assert stock == (True,)  # fast-reid 1.4.0's default
    trainer = ReidTrainer(tiny_cfg(tiny_market, str(tmp_path)))
    batch = next(iter(trainer.data_loader))

    def moved_after_steps(*default):
        torch.manual_seed(0)
        model = ReidTrainer.build_model(trainer.cfg).train()
        optimizer, _ = build_optimizer(trainer.cfg, model, *default)
        trained = [n for n, p in model.named_parameters() if p.requires_grad]
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for _ in range(3):
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        moved = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
        return moved, trained

    moved, trained = moved_after_steps(*stock)
    assert trained and moved == [], f"fast-reid's contiguous default moved {moved[:3]}"
    moved, trained = moved_after_steps()  # the default as patched by reidzoo.compat
    assert moved == trained


def test_cpu_amp_turned_off(tiny_market, tmp_path, caplog):
    cfg = tiny_cfg(tiny_market, str(tmp_path), **{"SOLVER.AMP.ENABLED": True})
    from reidzoo.engine import prepare_cfg

    out = prepare_cfg(cfg)
    assert out.SOLVER.AMP.ENABLED is False
    assert cfg.SOLVER.AMP.ENABLED is True  # caller's config untouched
    assert "AMP turned off" in caplog.text


def test_test_loader_honours_num_workers(tiny_market, tmp_path):
    cfg = tiny_cfg(tiny_market, str(tmp_path), **{"DATALOADER.NUM_WORKERS": 0})
    loader, num_query = ReidTrainer.build_test_loader(cfg, "Market1501")
    assert loader.num_workers == 0  # fast-reid's builder hard-codes 4
    assert num_query == 6


def test_train_checkpoint_and_eval(tiny_market, tmp_path):
    from reidzoo.engine.run_folder import RunFolderError

    out = str(tmp_path / "run")
    cfg = tiny_cfg(tiny_market, out, **{"SOLVER.MAX_EPOCH": 2, "TEST.EVAL_PERIOD": 2})
    trainer = ReidTrainer(cfg)
    trainer.resume_or_load(resume=False)
    results = trainer.train()
    assert {"Rank-1", "mAP", "mINP"} <= set(results)
    assert os.path.isfile(os.path.join(out, "model_final.pth"))
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read() == "model_final.pth"  # not model_best, written after it
    # a second new run into the same folder is refused (the CLI test checks files' hashes)
    with pytest.raises(RunFolderError, match="already holds a run"):
        ReidTrainer(cfg).resume_or_load(resume=False)


@pytest.mark.slow
def test_checkpoint_keep_deletes_only_older_periodic_checkpoints(tiny_market, tmp_path):
    out = str(tmp_path / "run")
    over = {"SOLVER.MAX_EPOCH": 5, "TEST.EVAL_PERIOD": 2, "REIDZOO.CHECKPOINT_KEEP": 2}
    trainer = ReidTrainer(tiny_cfg(tiny_market, out, **over))
    trainer.resume_or_load(resume=False)
    trainer.train()
    pth = sorted(f for f in os.listdir(out) if f.endswith(".pth"))
    # periodic after epochs 0-3 (epoch 4 is the final one): the two newest stay
    assert pth == ["model_0002.pth", "model_0003.pth", "model_best.pth", "model_final.pth"]
    assert torch.load(os.path.join(out, "model_0003.pth"), weights_only=True)["epoch"] == 3
    with open(os.path.join(out, "last_checkpoint")) as f:
        assert f.read() == "model_final.pth"
    with pytest.raises(ValueError, match="REIDZOO.CHECKPOINT_KEEP=-1"):
        over["REIDZOO.CHECKPOINT_KEEP"] = -1
        ReidTrainer(tiny_cfg(tiny_market, str(tmp_path / "bad"), **over))


def test_final_checkpoint_written_before_final_evaluation(tiny_market, tmp_path, monkeypatch):
    """A final evaluation that fails (bad test data, say) never costs the trained model."""
    out = str(tmp_path / "run")
    cfg = tiny_cfg(tiny_market, out, **{"SOLVER.MAX_EPOCH": 2, "TEST.EVAL_PERIOD": 2})
    trainer = ReidTrainer(cfg)
    trainer.resume_or_load(resume=False)

    def failing_test(cfg, model):
        raise OSError("cannot read image file 'gallery/broken.jpg'")

    monkeypatch.setattr(ReidTrainer, "test", classmethod(lambda cls, c, m: failing_test(c, m)))
    with pytest.raises(OSError, match="broken.jpg"):
        trainer.train()
    final = torch.load(os.path.join(out, "model_final.pth"), weights_only=True)
    assert final["epoch"] == 1
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(final["model"][k], v), k


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


@pytest.mark.slow
def test_train_net_cli_train_then_eval_only(tiny_market, tmp_path):
    out = str(tmp_path / "run")
    cfg = tiny_cfg(tiny_market, out, **{"SOLVER.MAX_EPOCH": 1, "TEST.EVAL_PERIOD": 1})
    cfg_file = _write_cfg(cfg, tmp_path / "cfg.yaml")
    r = _run_train_net(["--config-file", cfg_file])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "mAP" in r.stdout + r.stderr
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.json"))]
    assert metrics and all("total_loss" in m for m in metrics)
    r = _run_train_net(
        ["--config-file", cfg_file, "--eval-only", "MODEL.WEIGHTS", f"{out}/model_final.pth"]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Rank-1" in r.stdout + r.stderr
    # the evaluation at the end of training is that of the saved model_final.pth
    with (
        open(os.path.join(out, "results.json")) as f,
        open(os.path.join(out, "results_eval.json")) as g,
    ):
        during, after = json.load(f)["results"], json.load(g)["results"]
    assert {"Rank-1", "mAP", "mINP"} <= set(during)
    assert during == after


@pytest.mark.slow
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


@pytest.mark.slow
def test_two_cpu_processes_are_consistent_with_the_saved_model(tiny_market, tmp_path):
    """2 processes (gloo): every rank ends with the same full state (BatchNorm statistics
    included), and the evaluation during training is that of the saved model_final.pth."""
    out = str(tmp_path / "ddp")
    cfg = tiny_cfg(
        tiny_market,
        out,
        **{"SOLVER.MAX_ITER": 4, "TEST.EVAL_PERIOD": 4, "SOLVER.IMS_PER_BATCH": 8},
    )
    cfg_file = _write_cfg(cfg, tmp_path / "cfg.yaml")
    script = tmp_path / "ddp_check.py"
    script.write_text(
        "import torch\n"
        "from fastreid.utils import comm\n"
        "from reidzoo.engine import default_argument_parser, launch, setup, ReidTrainer\n"
        "from reidzoo.engine.launch import write_results\n"
        "def run(args):\n"
        "    cfg = setup(args)\n"
        "    t = ReidTrainer(cfg)\n"
        "    t.resume_or_load(resume=False)\n"
        "    write_results(cfg, t.train(), 'results.json')\n"
        "    assert comm.get_world_size() == 2\n"
        f"    torch.save(t.model.module.state_dict(), r'{out}/rank%d.pt' % comm.get_rank())\n"
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
    saved = torch.load(f"{out}/model_final.pth", weights_only=True)["model"]
    init = ReidTrainer.build_model(tiny_cfg(tiny_market, out, **{"MODEL.HEADS.NUM_CLASSES": 6}))
    assert set(a) == set(b) == set(saved)
    for k in a:  # parameters and buffers
        assert torch.equal(a[k], b[k]), k
        assert torch.equal(a[k], saved[k]), k
    bn_means = [k for k in a if k.endswith("running_mean")]
    assert bn_means and any(not torch.equal(a[k], init.state_dict()[k]) for k in bn_means)
    r = _run_train_net(
        ["--config-file", cfg_file, "--eval-only", "MODEL.WEIGHTS", f"{out}/model_final.pth"]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    with (
        open(os.path.join(out, "results.json")) as f,
        open(os.path.join(out, "results_eval.json")) as g,
    ):
        during, after = json.load(f)["results"], json.load(g)["results"]
    assert during.keys() == after.keys() and "mAP" in during
    for k in during:
        assert during[k] == pytest.approx(after[k], abs=1e-6), k


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
