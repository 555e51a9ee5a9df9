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


def _in_force():
    """Where each fix lives: fix name -> the object fast-reid uses now (for the two import-time
    fixes, whether the alias is in place)."""
    import collections
    import collections.abc
    import importlib

    from fastreid.data import common, data_utils
    from fastreid.data.transforms import build as tbuild
    from fastreid.evaluation import rank, reid_evaluation
    from fastreid.modeling.backbones import resnet
    from fastreid.modeling.losses import cross_entroy_loss
    from fastreid.modeling.meta_arch import baseline, mgn
    from fastreid.solver import build as solver_build
    from fastreid.utils import checkpoint, compute_dist, events
    from fastreid.utils.registry import Registry

    six = sys.modules.get("torch._six")
    assert common.read_image is data_utils.read_image  # both names fast-reid reads through
    assert mgn.MGN.preprocess_image is baseline.Baseline.preprocess_image
    return {
        "torch_six": six is not None and six.string_classes == (str, bytes),
        "collections_abc": collections.Mapping is collections.abc.Mapping,
        "dataloader_cpu": data_utils.DataLoaderX.__init__,
        "optimizer_contiguous": solver_build.build_optimizer.__defaults__,
        "cython_rank": reid_evaluation.ReidEvaluator._compile_dependencies,
        "rerank_cpu": compute_dist.compute_jaccard_distance,
        "baseline_inplace": baseline.Baseline.preprocess_image,
        "random_affine": tbuild.T,
        "read_image": data_utils.read_image,
        "pretrained_download": resnet.init_pretrained_weights,
        "launch_gloo": importlib.import_module("fastreid.engine.launch")._distributed_worker,
        "checkpoint_load": checkpoint.Checkpointer._load_file,
        "event_storage": cross_entroy_loss.get_event_storage,
        "registry_names": Registry.get,
        "small_gallery_cmc": rank.evaluate_rank,
        "printer_same_iter": events.CommonMetricPrinter.write,
    }


def test_every_fix_in_force_and_applying_again_wraps_nothing_twice(monkeypatch):
    """Each fix named in FIXES has replaced what fast-reid had (the object in use is not the
    one kept in ORIGINALS), and a second application changes neither ORIGINALS (which must keep
    fast-reid's own objects, or the "without the fix" tests would test the fix) nor wraps a
    wrapper again."""
    import_time = {"torch_six", "collections_abc"}  # shown by test_import_time_fixes
    now = _in_force()
    assert set(now) == set(compat.FIXES), "a fix without a check here, or a check without a fix"
    assert set(compat.ORIGINALS) == set(compat.FIXES) - import_time
    assert all(now[name] is True for name in import_time)
    for name, original in compat.ORIGINALS.items():
        assert now[name] is not original and now[name] != original, f"{name} not in force"
        assert not getattr(original, "_reidzoo_patched", False), f"ORIGINALS[{name}] is ours"
    originals = dict(compat.ORIGINALS)

    monkeypatch.setattr(compat, "_APPLIED", False)  # as if reidzoo were imported afresh
    assert compat.apply() == compat.FIXES
    again = _in_force()
    for name in compat.FIXES:
        assert compat.ORIGINALS.get(name) is originals.get(name), f"ORIGINALS[{name}] replaced"
        before, after = now[name], again[name]
        if hasattr(after, "__wrapped__"):  # a wrapper: still the one, around fast-reid's object
            assert after is before and after.__wrapped__ is originals[name], name
        elif callable(after):  # a replacement: the same code again, not a wrapper of itself
            assert after.__code__ is before.__code__, name
        else:
            assert after is before or after == before, name


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


def test_stock_pretrained_weights_try_to_download(tmp_path, monkeypatch):
    """Without the fix, PRETRAIN True and no PRETRAIN_PATH reach for the network (gdown)."""
    import types

    calls = []

    def download(url, output, quiet=False):
        calls.append((url, output))
        raise ConnectionError("no network in this test")

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=download))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConnectionError):
        compat.ORIGINALS["pretrained_download"]("18x")
    assert len(calls) == 1 and calls[0][0].startswith("http")
    assert calls[0][1].startswith(str(tmp_path))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the failure only shows without CUDA")
def test_launch_worker_runs_on_cpu_with_gloo(tmp_path):
    import torch.distributed as dist
    from fastreid.utils import comm

    url = f"file://{tmp_path / 'rendezvous'}"
    seen = []

    def main_func(tag):
        seen.append((tag, dist.get_backend(), comm.get_world_size(), comm.get_local_size()))

    with pytest.raises(AssertionError, match="cuda is not available"):
        compat.ORIGINALS["launch_gloo"](0, main_func, 1, 1, 0, url, ("stock",))
    import importlib

    # what fast-reid's launch() spawns: the module attribute (fastreid.engine.launch is also
    # the name of the function)
    worker = importlib.import_module("fastreid.engine.launch")._distributed_worker
    worker(0, main_func, 1, 1, 0, url, ("fixed",))
    assert seen == [("fixed", "gloo", 1, 1)]
    assert not dist.is_initialized()  # the process group is torn down after main_func


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

    with pytest.raises(KeyError) as stock:
        compat.ORIGINALS["registry_names"](META_ARCH_REGISTRY, "NoSuchArch")
    assert "NoSuchArch" in str(stock.value) and "Baseline" not in str(stock.value)
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
