"""One test per compatibility fix: what breaks without it, and that it works with it."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from reidzoo import compat
from tests.conftest import tiny_cfg


def _py(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_all_fixes_applied_once():
    assert compat.apply() == compat.FIXES
    assert compat.apply() == compat.FIXES  # idempotent
    assert set(compat.ORIGINALS) <= set(compat.FIXES)


def test_import_time_fixes():
    bare = _py(
        "import collections, collections.abc; collections.Mapping = collections.abc.Mapping;"
        "import fastreid.data"
    )
    assert bare.returncode != 0 and "torch._six" in bare.stderr
    six_only = _py(
        "import sys, types; m = types.ModuleType('torch._six'); m.string_classes = (str, bytes);"
        "sys.modules['torch._six'] = m; import fastreid.engine"
    )
    assert six_only.returncode != 0 and "Mapping" in six_only.stderr
    fixed = _py("import reidzoo, fastreid.engine, fastreid.data; print('ok')")
    assert fixed.returncode == 0 and "ok" in fixed.stdout, fixed.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the failure only shows without CUDA")
def test_dataloader_without_cuda():
    from fastreid.data.data_utils import DataLoaderX

    data = [{"images": torch.full((3,), float(i)), "targets": i} for i in range(6)]
    obj = DataLoaderX.__new__(DataLoaderX)
    with pytest.raises((RuntimeError, AssertionError, AttributeError)):
        compat.ORIGINALS["dataloader_cpu"](obj, 0, dataset=data, batch_size=2)
    loader = DataLoaderX(0, dataset=data, batch_size=2, pin_memory=True)
    batches = list(loader)
    assert len(batches) == 3 and batches[2]["targets"].tolist() == [4, 5]
    assert len(list(loader)) == 3  # re-iterable, like one epoch after another


def test_optimizer_default_not_contiguous():
    from fastreid.solver import build_optimizer
    from fastreid.solver.build import build_optimizer as same

    assert compat.ORIGINALS["optimizer_contiguous"] == (True,)
    assert build_optimizer.__defaults__ == (False,) and same is build_optimizer


def test_evaluator_never_compiles(monkeypatch):
    from fastreid.evaluation import rank_cylib, reid_evaluation

    def fail_make(*a, **k):
        raise AssertionError("tried to run make in site-packages")

    monkeypatch.setattr(subprocess, "run", fail_make)
    cfg = tiny_cfg("unused", "unused")
    reid_evaluation.ReidEvaluator(cfg, num_query=2)  # no compile attempt
    # without the fix: `make` fails and fast-reid exits the whole process
    monkeypatch.setattr(
        subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, returncode=2)
    )
    with pytest.raises(SystemExit):
        rank_cylib.compile_helper()


def _features():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 8, generator=g)


def test_rerank_runs_on_cpu():
    from fastreid.utils.compute_dist import build_dist

    f = _features()
    if not torch.cuda.is_available():
        with pytest.raises((RuntimeError, AssertionError, AttributeError)):
            compat.ORIGINALS["rerank_cpu"](f, k1=4, k2=2, search_option=0)
    d = build_dist(f[:4], f[4:], metric="jaccard", k1=4, k2=2)
    assert d.shape == (4, 8) and np.isfinite(d).all() and (d >= 0).all()


def test_baseline_does_not_modify_caller_images():
    from fastreid.modeling.meta_arch import build_model

    cfg = tiny_cfg("unused", "unused", **{"MODEL.HEADS.NUM_CLASSES": 4})
    model = build_model(cfg).eval()
    images = torch.rand(2, 3, 64, 32) * 255
    copy = images.clone()
    compat.ORIGINALS["baseline_inplace"](model, {"images": images})
    assert not torch.equal(images, copy)  # fast-reid's own preprocess writes into the input
    images = copy.clone()
    with torch.no_grad():
        a = model({"images": images})
        b = model(images)
    assert torch.equal(images, copy)
    assert torch.allclose(a, b)


def test_random_affine_builds():
    from fastreid.data.transforms import build_transforms

    orig_T = compat.ORIGINALS["random_affine"]
    with pytest.raises(TypeError):
        orig_T.RandomAffine(degrees=10, resample=False, fillcolor=0)
    cfg = tiny_cfg("unused", "unused", **{"INPUT.AFFINE.ENABLED": True})
    t = build_transforms(cfg, is_train=True)
    out = t(Image.fromarray(np.zeros((64, 32, 3), np.uint8)))
    assert tuple(out.shape) == (3, 64, 32)


def test_unreadable_image_names_the_file(tmp_path):
    from fastreid.data.common import CommDataset

    bad = tmp_path / "0001_c1s1_000000_00.jpg"
    bad.write_bytes(b"not an image")
    ds = CommDataset([(str(bad), 1, 1)], transform=None, relabel=False)
    with pytest.raises(OSError, match=str(bad)):
        ds[0]


def test_pretrained_without_path_is_a_clear_error():
    from fastreid.modeling.backbones import build_resnet_backbone

    cfg = tiny_cfg("unused", "unused", **{"MODEL.BACKBONE.PRETRAIN": True})
    with pytest.raises(FileNotFoundError, match="PRETRAIN_PATH"):
        build_resnet_backbone(cfg)


def test_training_forward_outside_trainer():
    from fastreid.modeling.meta_arch import build_model

    cfg = tiny_cfg("unused", "unused", **{"MODEL.HEADS.NUM_CLASSES": 4})
    model = build_model(cfg).train()
    batch = {"images": torch.rand(4, 3, 64, 32) * 255, "targets": torch.tensor([0, 0, 1, 1])}
    with pytest.raises(AssertionError, match="EventStorage"):
        compat.ORIGINALS["event_storage"]()
    losses = model(batch)
    assert set(losses) == {"loss_cls", "loss_triplet"}


def test_registry_error_lists_names():
    from reidzoo.registry import META_ARCH_REGISTRY

    with pytest.raises(KeyError, match="Registered names: .*Baseline"):
        META_ARCH_REGISTRY.get("NoSuchArch")


def test_fastreid_checkpoint_loads_weights_only(tmp_path):
    from fastreid.utils.checkpoint import Checkpointer

    from reidzoo.checkpoint import UnsafeCheckpointError

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [3, 5])  # milestones: a Counter
    data = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}
    path = os.path.join(tmp_path, "x.pth")
    torch.save({**data, "lr_sched": sched.state_dict(), "metric": 0.5}, path)
    out = Checkpointer(torch.nn.Linear(2, 2)).load(path)  # fast-reid's own class, patched
    assert out["epoch"] == 3 and out["lr_sched"]["milestones"] == {3: 1, 5: 1}
    # torch's default refuses a numpy scalar with a message naming neither file nor way out;
    # the patched reader names both, and a checkpointer marked trusted loads it
    legacy = os.path.join(tmp_path, "legacy.pth")
    torch.save({**data, "metric": np.float64(0.5)}, legacy)
    with pytest.raises(pickle.UnpicklingError) as info:
        compat.ORIGINALS["checkpoint_load"](Checkpointer(torch.nn.Linear(2, 2)), legacy)
    assert "legacy.pth" not in str(info.value)
    with pytest.raises(UnsafeCheckpointError, match=r"legacy\.pth.*numpy.*WEIGHTS_ONLY False"):
        Checkpointer(torch.nn.Linear(2, 2)).load(legacy)
    trusted = Checkpointer(torch.nn.Linear(2, 2))
    trusted.trusted = True
    assert trusted.load(legacy)["metric"] == 0.5


def test_small_gallery_cmc_is_padded():
    from fastreid.evaluation import rank

    rng = np.random.default_rng(0)
    dist = rng.random((3, 4))
    q, g = np.array([1, 2, 3]), np.array([1, 2, 3, 4])
    qc, gc = np.zeros(3, int), np.ones(4, int)
    cmc_orig = compat.ORIGINALS["small_gallery_cmc"](dist, q, g, qc, gc)[0]
    assert len(cmc_orig) == 4  # fast-reid's ReidEvaluator then fails on cmc[4] (Rank-5)
    cmc, aps, inps = rank.evaluate_rank(dist, q, g, qc, gc)
    assert len(cmc) == 50
    assert np.array_equal(cmc[:4], cmc_orig) and (cmc[4:] == cmc_orig[-1]).all()
    assert cmc[-1] == 1.0


def test_metric_printer_twice_in_one_iteration():
    from fastreid.utils.events import CommonMetricPrinter, EventStorage

    with EventStorage(0) as storage:
        storage.epoch = 0  # set by the trainer's before_epoch
        storage.put_scalar("total_loss", 1.0)
        printer = CommonMetricPrinter(max_iter=2)
        printer.write()
        with pytest.raises(ZeroDivisionError):
            compat.ORIGINALS["printer_same_iter"](printer)
        printer.write()  # the second write at the same iteration is skipped
        storage.step()
        storage.put_scalar("total_loss", 0.5)
        printer.write()
        assert printer._last_write[0] == 1
