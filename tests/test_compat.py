"""One test per compatibility fix (what breaks without it, and that it works with it), the
version guards, and reidzoo's own behaviour living in its own classes while `import reidzoo`
leaves stock fast-reid's behaviour alone."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from reidzoo import compat
from tests.helpers import tiny_cfg


def _py(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def _in_force():
    """Where each fix lives: fix name -> the object fast-reid uses now (for the two import-time
    fixes, whether the alias is in place)."""
    import collections
    import collections.abc
    import importlib

    from fastreid.data import data_utils
    from fastreid.data.transforms import build as tbuild
    from fastreid.evaluation import reid_evaluation
    from fastreid.solver import build as solver_build
    from fastreid.utils import checkpoint, compute_dist

    six = sys.modules.get("torch._six")
    return {
        "torch_six": six is not None and six.string_classes == (str, bytes),
        "collections_abc": collections.Mapping is collections.abc.Mapping,
        "dataloader_cpu": data_utils.DataLoaderX.__init__,
        "optimizer_contiguous": solver_build.build_optimizer.__defaults__,
        "cython_rank": reid_evaluation.ReidEvaluator._compile_dependencies,
        "rerank_cpu": compute_dist.compute_jaccard_distance,
        "random_affine": tbuild.T,
        "launch_gloo": importlib.import_module("fastreid.engine.launch")._distributed_worker,
        "checkpoint_load": checkpoint.Checkpointer._load_file,
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


@pytest.mark.slow  # a fresh interpreter per check
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


def test_random_affine_builds():
    from fastreid.data.transforms import build_transforms

    orig_T = compat.ORIGINALS["random_affine"]
    with pytest.raises(TypeError):
        orig_T.RandomAffine(degrees=10, resample=False, fillcolor=0)
    cfg = tiny_cfg("unused", "unused", **{"INPUT.AFFINE.ENABLED": True})
    t = build_transforms(cfg, is_train=True)
    out = t(Image.fromarray(np.zeros((64, 32, 3), np.uint8)))
    assert tuple(out.shape) == (3, 64, 32)


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


# ------------------------------------------------------------------------------ version guards
def test_fixes_are_guarded_by_the_versions_that_need_them():
    """Each fix applies only with fast-reid <= 1.4.0 and the torch / torchvision / Python
    version that broke it; with today's versions every one is needed."""
    today = compat.installed_versions()
    assert today["fastreid"] == (1, 4, 0)
    assert compat.FIXES == tuple(compat.FIX_TABLE) and compat.SKIPPED == {}
    old_stack = {"fastreid": (1, 4, 0), "torch": (1, 13, 1), "torchvision": (0, 14, 1),
                 "python": (3, 9, 18)}  # fmt: skip
    assert not compat.needed("torch_six", old_stack)
    assert not compat.needed("collections_abc", old_stack)
    assert not compat.needed("optimizer_contiguous", old_stack)
    assert not compat.needed("checkpoint_load", dict(today, torch=(2, 5, 1)))
    assert compat.needed("checkpoint_load", dict(today, torch=(2, 6, 0)))
    assert not compat.needed("random_affine", dict(today, torchvision=(0, 12, 0)))
    assert compat.needed("dataloader_cpu", old_stack)  # a CPU fix: any torch
    later = dict(today, fastreid=(1, 5, 0))
    assert not any(compat.needed(name, later) for name in compat.FIX_TABLE)


# ------------------------------------- reidzoo's own behaviour; import reidzoo leaves fast-reid
STOCK = """
import torch
import reidzoo, reidzoo.engine, reidzoo.evaluation, reidzoo.modeling, reidzoo.data
from fastreid.data import common, data_utils
from fastreid.evaluation import rank
from fastreid.modeling.backbones import resnet
from fastreid.modeling.losses import cross_entroy_loss
from fastreid.modeling.meta_arch import MGN, Baseline, build_model
from fastreid.utils import events
from fastreid.utils.registry import Registry
objs = {
    "Baseline.preprocess_image": Baseline.preprocess_image,
    "MGN.preprocess_image": MGN.preprocess_image,
    "read_image": data_utils.read_image,
    "CommDataset read_image": common.read_image,
    "init_pretrained_weights": resnet.init_pretrained_weights,
    "loss get_event_storage": cross_entroy_loss.get_event_storage,
    "Registry.get": Registry.get,
    "evaluate_rank": rank.evaluate_rank,
    "CommonMetricPrinter.write": events.CommonMetricPrinter.write,
}
for name, obj in objs.items():
    print("MODULE", name, obj.__module__)
from reidzoo.config import get_cfg
cfg = get_cfg()
cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.PRETRAIN", False,
                     "MODEL.BACKBONE.DEPTH", "18x", "MODEL.BACKBONE.FEAT_DIM", 512])
images = torch.rand(1, 3, 64, 32) * 255
copy = images.clone()
build_model(cfg).eval()(images)
print("STOCK_IN_PLACE", not torch.equal(images, copy))
"""


@pytest.mark.slow  # a fresh interpreter per check
def test_import_reidzoo_leaves_stock_fastreid_behaviour():
    """After importing reidzoo (engine, data, modeling, evaluation), every fast-reid object
    whose behaviour reidzoo changes for itself is still fast-reid's own, and a Baseline built
    with fast-reid's build_model still normalises the caller's images in place, as stock."""
    r = _py(STOCK)
    assert r.returncode == 0, r.stderr[-3000:]
    modules = {
        " ".join(line.split()[1:-1]): line.split()[-1]
        for line in r.stdout.splitlines()
        if line.startswith("MODULE ")
    }
    assert len(modules) == 9
    for name, module in modules.items():
        assert module.startswith("fastreid."), (name, module)
    assert "STOCK_IN_PLACE True" in r.stdout


def test_reidzoo_build_normalises_baseline_and_mgn_out_of_place():
    from fastreid.modeling.meta_arch import build_model as fastreid_build_model

    from reidzoo.modeling.build import build_model

    cfg = tiny_cfg("unused", "unused", **{"MODEL.HEADS.NUM_CLASSES": 4})
    images = torch.rand(2, 3, 64, 32) * 255
    copy = images.clone()
    stock = fastreid_build_model(cfg).eval()
    with torch.no_grad():
        stock({"images": images})
    assert not torch.equal(images, copy)  # fast-reid's own preprocess writes into the input
    model = build_model(cfg).eval()
    model.load_state_dict(stock.state_dict())
    images = copy.clone()
    with torch.no_grad():
        a = model({"images": images})
        b = model(images)
        ref = stock(copy.clone())
    assert torch.equal(images, copy) and torch.allclose(a, b) and torch.allclose(a, ref)
    cfg.MODEL.META_ARCHITECTURE = "MGN"  # fast-reid's MGN copies bottleneck (ResNet-50) stages
    cfg.MODEL.BACKBONE.DEPTH, cfg.MODEL.BACKBONE.FEAT_DIM = "50x", 2048
    cfg.MODEL.HEADS.EMBEDDING_DIM = 256
    images = torch.rand(2, 3, 96, 32) * 255  # MGN cuts the map into 3 stripes
    copy = images.clone()
    with torch.no_grad():
        build_model(cfg).eval()(images)
    assert torch.equal(images, copy)


def test_unreadable_image_names_the_file(tmp_path):
    from fastreid.data.common import CommDataset

    from reidzoo.data.build import ReidDataset

    bad = tmp_path / "0001_c1s1_000000_00.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(OSError, match=str(bad)):
        ReidDataset([(str(bad), 1, 1)], transform=None, relabel=False)[0]
    # fast-reid's reader keeps 4 channels of an RGBA file (a tensor-size error in collate)
    Image.fromarray(np.zeros((8, 4, 4), np.uint8)).save(tmp_path / "rgba.png")
    item = ReidDataset([(str(tmp_path / "rgba.png"), 7, 3)], transform=None, relabel=True)[0]
    assert item["images"].mode == "RGB" and (item["targets"], item["camids"]) == (0, 0)
    assert CommDataset([(str(tmp_path / "rgba.png"), 7, 3)], None, False)[0]["images"].mode == (
        "RGBA"
    )


def test_pretrained_without_path_is_a_clear_error(tmp_path, monkeypatch):
    """reidzoo's build path refuses PRETRAIN True without a path; fast-reid's own builder
    (untouched) reaches for the network (gdown)."""
    import types

    from fastreid.modeling.backbones import build_resnet_backbone

    from reidzoo.modeling.build import build_model

    cfg = tiny_cfg("unused", "unused", **{"MODEL.BACKBONE.PRETRAIN": True})
    cfg.MODEL.BACKBONE.NAME = "build_resnet_backbone"
    with pytest.raises(FileNotFoundError, match="PRETRAIN_PATH"):
        build_model(cfg)
    calls = []

    def download(url, output, quiet=False):
        calls.append((url, output))
        raise ConnectionError("no network in this test")

    monkeypatch.setitem(sys.modules, "gdown", types.SimpleNamespace(download=download))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(ConnectionError):
        build_resnet_backbone(cfg)
    assert len(calls) == 1 and calls[0][0].startswith("http")
    assert calls[0][1].startswith(str(tmp_path))


def test_training_forward_outside_trainer():
    """reidzoo's meta-architectures, and the Baseline reidzoo's build path builds, run a
    training-mode forward without a trainer (a throwaway EventStorage); fast-reid's Baseline
    from fast-reid's build_model, untouched, asserts there is one."""
    from fastreid.modeling.meta_arch import build_model
    from fastreid.utils.events import EventStorage

    from reidzoo.config import setup_cfg
    from reidzoo.modeling.build import build_model as zoo_build_model
    from tests.helpers import REPO

    cfg = tiny_cfg("unused", "unused", **{"MODEL.HEADS.NUM_CLASSES": 4})
    model = build_model(cfg).train()
    batch = {"images": torch.rand(4, 3, 64, 32) * 255, "targets": torch.tensor([0, 0, 1, 1])}
    with pytest.raises(AssertionError, match="EventStorage"):
        model(dict(batch, images=batch["images"].clone()))
    with EventStorage(0):
        assert set(model(dict(batch, images=batch["images"].clone()))) == {
            "loss_cls",
            "loss_triplet",
        }
    zoo = zoo_build_model(cfg).train()  # the same Baseline, from reidzoo's build path
    assert set(zoo(dict(batch, images=batch["images"].clone()))) == {"loss_cls", "loss_triplet"}
    pmm = setup_cfg(
        os.path.join(REPO, "projects", "PMM", "configs", "PMM_R18_synthetic_ci.yml"),
        ["MODEL.DEVICE", "cpu", "MODEL.HEADS.NUM_CLASSES", "4"],
    )
    paper = build_model(pmm).train()
    losses = paper(dict(batch, images=torch.rand(4, 3, *pmm.INPUT.SIZE_TRAIN) * 255))
    assert losses and all(torch.isfinite(v) for v in losses.values())


def test_registry_errors_list_names():
    from fastreid.modeling.meta_arch import build_model

    from reidzoo.modeling.build import build_model as reidzoo_build_model
    from reidzoo.registry import META_ARCH_REGISTRY

    cfg = tiny_cfg("unused", "unused")
    cfg.MODEL.META_ARCHITECTURE = "NoSuchArch"
    with pytest.raises(KeyError) as stock:
        build_model(cfg)
    assert "NoSuchArch" in str(stock.value) and "Baseline" not in str(stock.value)
    assert META_ARCH_REGISTRY.get.__module__ == "fastreid.utils.registry"
    with pytest.raises(KeyError, match="MODEL.META_ARCHITECTURE: .*NoSuchArch.*Baseline"):
        reidzoo_build_model(cfg)


def test_small_gallery_is_evaluated_with_a_flat_cmc():
    """fast-reid's ReidEvaluator cannot report Rank-5/10 below 10 gallery images (its CMC is
    cut at the gallery size); reidzoo's build_reid_evaluator then picks the chunked evaluator,
    whose CMC is flat past the gallery size."""
    from fastreid.evaluation import ReidEvaluator, rank

    from reidzoo.evaluation import ChunkedReidEvaluator, build_reid_evaluator

    rng = np.random.default_rng(0)
    dist = rng.random((3, 4))
    q, g = np.array([1, 2, 3]), np.array([1, 2, 3, 4])
    qc, gc = np.zeros(3, int), np.ones(4, int)
    cmc_stock = rank.evaluate_rank(dist, q, g, qc, gc)[0]
    assert len(cmc_stock) == 4  # fast-reid's ReidEvaluator then fails on cmc[4] (Rank-5)
    cfg = tiny_cfg("unused", "unused")
    assert type(build_reid_evaluator(cfg, 3, 12)) is ReidEvaluator
    evaluator = build_reid_evaluator(cfg, 3, 4)
    assert isinstance(evaluator, ChunkedReidEvaluator)
    feats = torch.from_numpy(rng.random((7, 8)).astype(np.float32))
    evaluator.reset()
    evaluator.process(
        {"targets": torch.from_numpy(np.r_[q, g]), "camids": torch.from_numpy(np.r_[qc, gc])},
        feats,
    )
    results = evaluator.evaluate()
    assert results["Rank-5"] == results["Rank-10"] == 100.0


def test_metric_printer_twice_in_one_iteration():
    from fastreid.utils.events import CommonMetricPrinter, EventStorage

    from reidzoo.engine.trainer import MetricPrinter

    with EventStorage(0) as storage:
        storage.epoch = 0  # set by the trainer's before_epoch
        storage.put_scalar("total_loss", 1.0)
        stock = CommonMetricPrinter(max_iter=2)
        stock.write()
        with pytest.raises(ZeroDivisionError):
            stock.write()  # fast-reid's printer, untouched
        printer = MetricPrinter(max_iter=2)
        printer.write()
        printer.write()  # the second write at the same iteration is skipped
        storage.step()
        storage.put_scalar("total_loss", 0.5)
        printer.write()
        assert printer._last_write[0] == 1
