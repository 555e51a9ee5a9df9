"""Checkpoints are read without running code: a crafted pickle is refused by every entry point
(and its payload never runs), while real fast-reid and reidzoo checkpoints load."""

import logging
import os
import pickletools
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from reidzoo import checkpoint as ck
from reidzoo.checkpoint import UnsafeCheckpointError, load_file, load_weights
from reidzoo.config import get_cfg
from reidzoo.engine import ReidTrainer
from tests.helpers import tiny_cfg, write_market

PAYLOAD_GLOBAL = f"{open.__module__}.{open.__qualname__}"  # "io.open"


class Payload:
    """Unpickling this creates ``marker``: the stand-in for arbitrary code in a ``.pth``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def craft(path, marker, state=None, legacy=False):
    """A checkpoint with valid model weights whose pickle also creates ``marker`` if loaded."""
    data = {"model": dict(state or {}), "epoch": 0, "note": Payload(str(marker))}
    torch.save(data, str(path), _use_new_zipfile_serialization=not legacy)
    return str(path)


def assert_refused(excinfo, path, marker):
    message = str(excinfo.value)
    assert os.path.basename(path) in message, message
    assert PAYLOAD_GLOBAL in message and "REIDZOO.WEIGHTS_ONLY False" in message, message
    assert not os.path.exists(marker), "the payload ran"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_market(str(tmp_path_factory.mktemp("safe_market")))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root):
    """A run of reidzoo's real trainer: 2 iterations, warmup, checkpoints and an evaluation."""
    out = str(tmp_path_factory.mktemp("safe_run"))
    cfg = tiny_cfg(data_root, out, **{
        "SOLVER.MAX_ITER": 2, "SOLVER.WARMUP_ITERS": 1, "SOLVER.STEPS": [1],
        "SOLVER.CHECKPOINT_PERIOD": 1, "TEST.EVAL_PERIOD": 2,
    })  # fmt: skip
    trainer = ReidTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    files = sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".pth"))
    assert any(f.endswith("model_final.pth") for f in files), files
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    return {"cfg": trainer.cfg, "out": out, "files": files, "state": state}


def _pickle_globals(path):
    """The ``module.name`` globals a zip-format ``torch.save`` file's pickle refers to."""
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        ops = pickletools.genops(z.read(name))
        return {arg.replace(" ", ".") for op, arg, _ in ops if op.name == "GLOBAL"}


# ---------------------------------------------------------------------------------- refusing


def test_payload_is_live_when_trusted(tmp_path, caplog):
    """The crafted file really runs code when unpickled completely (the opt-in), with a
    warning: so the refusals below are refusals of a live payload."""
    marker = tmp_path / "ran"
    path = craft(tmp_path / "evil.pth", marker)
    with caplog.at_level(logging.WARNING, logger="reidzoo.checkpoint"):
        load_file(path, trusted=True)
    assert marker.exists()
    assert any("weights_only=False" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_load_file_and_load_weights_refuse(tmp_path, legacy):
    marker = str(tmp_path / "ran")
    path = craft(tmp_path / "evil.pth", marker, legacy=legacy)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_file(path)
    assert_refused(info, path, marker)
    assert info.value.path == path and PAYLOAD_GLOBAL in info.value.needed
    with pytest.raises(UnsafeCheckpointError) as info:
        load_weights(torch.nn.Linear(2, 2), path)
    assert_refused(info, path, marker)


def test_stock_fastreid_checkpointer_refuses(tmp_path):
    from fastreid.utils.checkpoint import Checkpointer

    marker = str(tmp_path / "ran")
    path = craft(tmp_path / "evil.pth", marker)
    with pytest.raises(UnsafeCheckpointError) as info:
        Checkpointer(torch.nn.Linear(2, 2)).load(path)
    assert_refused(info, path, marker)


def test_trainer_model_weights_refuses_unless_trusted(tmp_path, data_root, trained):
    marker = str(tmp_path / "ran")
    path = craft(tmp_path / "evil.pth", marker, state=trained["state"])
    cfg = tiny_cfg(data_root, str(tmp_path / "run"), **{"MODEL.WEIGHTS": path})
    with pytest.raises(UnsafeCheckpointError) as info:
        ReidTrainer(cfg).resume_or_load(resume=False)
    assert_refused(info, path, marker)
    # REIDZOO.WEIGHTS_ONLY False: the file is declared trusted and unpickled completely
    cfg = tiny_cfg(data_root, str(tmp_path / "run2"), **{"MODEL.WEIGHTS": path})
    cfg.REIDZOO.WEIGHTS_ONLY = False
    trainer = ReidTrainer(cfg)
    trainer.resume_or_load(resume=False)
    assert os.path.exists(marker)
    assert torch.equal(trainer.model.state_dict()["heads.weight"], trained["state"]["heads.weight"])


def test_trainer_resume_refuses(tmp_path, data_root, trained):
    out = tmp_path / "run"
    out.mkdir()
    marker = str(tmp_path / "ran")
    path = craft(out / "model_0000.pth", marker, state=trained["state"])
    (out / "last_checkpoint").write_text("model_0000.pth")
    cfg = tiny_cfg(data_root, str(out), **{"SOLVER.MAX_ITER": 4})
    with pytest.raises(UnsafeCheckpointError) as info:
        ReidTrainer(cfg).resume_or_load(resume=True)
    assert_refused(info, path, marker)


def test_eval_only_refuses(tmp_path, data_root, trained):
    from reidzoo.engine import default_argument_parser, main

    marker = str(tmp_path / "ran")
    path = craft(tmp_path / "evil.pth", marker, state=trained["state"])
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(tiny_cfg(data_root, str(tmp_path / "eval")).dump())
    argv = ["--config-file", str(cfg_file), "--eval-only", "MODEL.WEIGHTS", path]
    with pytest.raises(UnsafeCheckpointError) as info:
        main(default_argument_parser().parse_args(argv))
    assert_refused(info, path, marker)


def test_extract_export_and_maps_refuse(tmp_path, capsys, data_root, trained):
    from reidzoo import export, extract
    from reidzoo.visualize import maps

    marker = str(tmp_path / "ran")
    path = craft(tmp_path / "evil.pth", marker, state=trained["state"])
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(tiny_cfg(data_root, str(tmp_path / "out")).dump())
    image = str(tmp_path / "person.png")
    Image.fromarray(np.zeros((64, 32, 3), np.uint8)).save(image)
    npz = tmp_path / "feats.npz"
    argv = ["--config-file", str(cfg_file), "--checkpoint", path, "--input", image]
    assert extract.main(argv + ["--output", str(npz)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: refusing to load checkpoint"), err
    assert path in err[0] and PAYLOAD_GLOBAL in err[0]
    assert not npz.exists() and not os.path.exists(marker)
    onnx_file = tmp_path / "model.onnx"
    with pytest.raises(UnsafeCheckpointError) as info:  # MODEL.WEIGHTS or --checkpoint alike
        export.main(["--config-file", str(cfg_file), "--output", str(onnx_file),
                     "MODEL.WEIGHTS", path])  # fmt: skip
    assert_refused(info, path, marker)
    assert not onnx_file.exists()
    with pytest.raises(UnsafeCheckpointError) as info:
        maps.main(argv + ["--output", str(tmp_path / "maps")])
    assert_refused(info, path, marker)


def test_pretrain_path_refuses_and_trusted_legacy_file_loads(tmp_path, caplog):
    from fastreid.modeling.meta_arch import build_model

    def cfg_with(path, weights_only=True):
        cfg = get_cfg()
        cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.NAME",
                             "build_staged_resnet_backbone", "MODEL.BACKBONE.DEPTH", "18x",
                             "MODEL.BACKBONE.FEAT_DIM", 512, "MODEL.BACKBONE.PRETRAIN", True,
                             "MODEL.BACKBONE.PRETRAIN_PATH", path,
                             "REIDZOO.WEIGHTS_ONLY", weights_only])  # fmt: skip
        return cfg

    marker = str(tmp_path / "ran")
    path = craft(tmp_path / "evil.pth", marker)
    with pytest.raises(UnsafeCheckpointError) as info:
        build_model(cfg_with(path))
    assert_refused(info, path, marker)
    assert "MODEL.BACKBONE.PRETRAIN_PATH" in str(info.value)
    # a legacy ImageNet training checkpoint: weights plus a numpy scalar
    from reidzoo.modeling.backbone import StagedResNet

    torch.manual_seed(3)
    weights = StagedResNet(depth="18x").state_dict()
    legacy = str(tmp_path / "resnet18_legacy.pth")
    torch.save({"state_dict": weights, "best_acc1": np.float64(69.8)}, legacy)
    with pytest.raises(UnsafeCheckpointError, match=r"resnet18_legacy\.pth.*numpy"):
        build_model(cfg_with(legacy))
    with caplog.at_level(logging.WARNING, logger="reidzoo.checkpoint"):
        model = build_model(cfg_with(legacy, weights_only=False))
    assert torch.equal(model.backbone.conv1.weight, weights["conv1.weight"])
    assert any("weights_only=False" in r.getMessage() for r in caplog.records)


def test_feature_npz_never_unpickles(tmp_path, capsys, data_root):
    from reidzoo.extract import load_features
    from reidzoo.visualize.__main__ import main as visualize_main

    marker = str(tmp_path / "ran")
    npz = str(tmp_path / "evil.npz")
    payload = np.array([Payload(marker)], dtype=object)
    np.savez(npz, features=np.zeros((1, 4), np.float32), names=payload)  # pickles `names`
    with pytest.raises(ValueError, match="allow_pickle"):
        load_features(npz)
    assert not os.path.exists(marker)
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(tiny_cfg(data_root, str(tmp_path / "out")).dump())
    argv = ["ranks", "--config-file", str(cfg_file), "--features", npz,
            "--output", str(tmp_path / "vis")]  # fmt: skip
    assert visualize_main(argv) == 1
    assert "allow_pickle" in capsys.readouterr().err
    assert not os.path.exists(marker)


# ------------------------------------------------------------------------ real checkpoints


def test_real_trainer_checkpoints_load_weights_only(tmp_path, data_root, trained):
    for path in trained["files"]:
        data = load_file(path)  # weights only, the default
        assert set(data) >= {"model", "optimizer", "lr_sched", "epoch"}, path
        assert not set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - {
            ck._global_name(g) for g in ck.SAFE_GLOBALS
        }, path
    final = os.path.join(trained["out"], "model_final.pth")
    model = ReidTrainer.build_model(trained["cfg"])
    load_weights(model, final)
    for key, value in trained["state"].items():
        assert torch.equal(model.state_dict()[key], value), key
    # --resume of the run reads the same files (model, optimizer, schedulers) weights-only
    resumed = ReidTrainer(trained["cfg"])
    resumed.resume_or_load(resume=True)
    assert resumed.start_epoch == 2
    saved = load_file(final)["optimizer"]["state"]
    now = resumed.optimizer.state_dict()["state"]
    assert saved.keys() == now.keys() and torch.equal(saved[0]["exp_avg"], now[0]["exp_avg"])


def test_stock_fastreid_checkpoint_loads_weights_only(tmp_path):
    """What fast-reid's DefaultTrainer writes: its checkpointer, its optimizer and its
    MultiStepLR + warmup schedulers, epoch and a float metric (PeriodicCheckpointer)."""
    from fastreid.modeling.meta_arch import build_model
    from fastreid.solver import build_lr_scheduler, build_optimizer
    from fastreid.utils.checkpoint import Checkpointer

    cfg = tiny_cfg(str(tmp_path), str(tmp_path), **{"MODEL.HEADS.NUM_CLASSES": 6,
                                                   "SOLVER.WARMUP_ITERS": 2})  # fmt: skip
    model = build_model(cfg)
    optimizer, _ = build_optimizer(cfg, model)
    scheds = build_lr_scheduler(cfg, optimizer, iters_per_epoch=3)
    assert set(scheds) == {"lr_sched", "warmup_sched"}
    Checkpointer(model, str(tmp_path), **scheds, optimizer=optimizer).save(
        "model_final", epoch=1, metric=55.5
    )
    path = str(tmp_path / "model_final.pth")
    needed = _pickle_globals(path)
    # every allow-listed global is one these files really hold (the list is not wider)
    assert {ck._global_name(g) for g in ck.SAFE_GLOBALS} <= needed, needed
    data = load_file(path)
    assert data["lr_sched"]["milestones"] == {100: 1} and data["metric"] == 55.5
    other = build_model(cfg)
    load_weights(other, path)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in model.state_dict().items())
    out = Checkpointer(build_model(cfg)).load(path)  # fast-reid's own class, patched
    assert out["epoch"] == 1
