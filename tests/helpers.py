"""Plain helpers shared by the tests: tiny datasets and configs, training-step drivers.

Import them with ``from tests.helpers import ...`` (pyproject's pytest ``pythonpath`` puts the
repository on ``sys.path``, for ``pytest`` as for ``python -m pytest``). Fixtures, and the
session's environment set-up, are in ``conftest.py``.
"""

import os
import subprocess
import sys
import sysconfig

import numpy as np
from PIL import Image

from reidzoo.config import get_cfg, setup_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("REIDZOO_SHARED_DATA", os.path.join(REPO, "..", "shared", "data"))


def write_market(root, num_ids=6, cams=2, per_cam=2, size=(64, 32), seed=0):
    """A tiny Market-1501-layout dataset of random-colour images; returns the folder."""
    rng = np.random.default_rng(seed)
    base = os.path.join(root, "Market-1501-v15.09.15")
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    h, w = size
    for pid in range(1, num_ids + 1):
        colour = rng.integers(0, 255, 3)
        for cam in range(1, cams + 1):
            for k in range(per_cam):
                img = np.clip(colour + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
                name = f"{pid:04d}_c{cam}s1_{k:06d}_00.jpg"
                Image.fromarray(img).save(os.path.join(base, "bounding_box_train", name))
                sub = "query" if (cam == 1 and k == 0) else "bounding_box_test"
                Image.fromarray(img).save(os.path.join(base, sub, name))
    return root


def tiny_cfg(root, output_dir, **overrides):
    """A ResNet-18 Baseline on 64x32 images, batch 8 (P=4 x K=2), CPU, no workers."""
    cfg = get_cfg()
    cfg.merge_from_list(
        [
            "MODEL.DEVICE",
            "cpu",
            "MODEL.BACKBONE.NAME",
            "build_staged_resnet_backbone",
            "MODEL.BACKBONE.DEPTH",
            "18x",
            "MODEL.BACKBONE.FEAT_DIM",
            512,
            "MODEL.BACKBONE.PRETRAIN",
            False,
            "MODEL.HEADS.NAME",
            "EmbeddingHead",
            "MODEL.HEADS.NECK_FEAT",
            "before",
            "MODEL.HEADS.WITH_BNNECK",
            True,
            "MODEL.HEADS.POOL_LAYER",
            "GlobalAvgPool",
            "MODEL.HEADS.CLS_LAYER",
            "Linear",
            "MODEL.LOSSES.NAME",
            ("CrossEntropyLoss", "TripletLoss"),
            "MODEL.LOSSES.TRI.HARD_MINING",
            True,
            "INPUT.SIZE_TRAIN",
            [64, 32],
            "INPUT.SIZE_TEST",
            [64, 32],
            "DATASETS.NAMES",
            ("Market1501",),
            "DATASETS.TESTS",
            ("Market1501",),
            "DATASETS.ROOT",
            root,
            "DATALOADER.SAMPLER_TRAIN",
            "NaiveIdentitySampler",
            "DATALOADER.NUM_INSTANCE",
            2,
            "DATALOADER.NUM_WORKERS",
            0,
            "SOLVER.IMS_PER_BATCH",
            8,
            "SOLVER.OPT",
            "Adam",
            "SOLVER.BASE_LR",
            1e-3,
            "SOLVER.MAX_EPOCH",
            2,
            "SOLVER.WARMUP_ITERS",
            0,
            "SOLVER.STEPS",
            [100],
            "SOLVER.CHECKPOINT_PERIOD",
            1,
            "REIDZOO.CHECKPOINT_KEEP",  # the suite's disk: one periodic checkpoint per run
            1,
            "TEST.EVAL_PERIOD",
            100,
            "TEST.IMS_PER_BATCH",
            16,
            "OUTPUT_DIR",
            output_dir,
            "REIDZOO.SEED",
            0,
        ]
    )
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    return cfg


#: The overrides of every unit-test model: on the CPU, the backbone from random initialisation.
CPU = ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.PRETRAIN", "False"]


def cpu_cfg(config_file=None, *opts, num_classes=None, weights=None, **overrides):
    """A config on the CPU whose backbone starts from random initialisation (:data:`CPU`).

    Merged in this order, later values winning: :data:`CPU`, ``num_classes``, ``weights``,
    ``opts``, ``overrides``.

    Args:
        config_file (str | None): a YAML config or registered model name, read as train_net.py
            reads it (:func:`reidzoo.config.setup_cfg`, its ``REIDZOO.CUSTOM_IMPORTS`` imported);
            None for the defaults of :func:`reidzoo.config.get_cfg`.
        *opts: flat ``KEY, VALUE, ...`` overrides (strings or Python values).
        num_classes (int | None): ``MODEL.HEADS.NUM_CLASSES`` when not None.
        weights (str | None): ``MODEL.WEIGHTS`` when not None (``""``: none).
        **overrides: ``{"KEY": value}`` overrides, e.g. ``**{"MODEL.BACKBONE.DEPTH": "18x"}``.
    Returns:
        CfgNode: not frozen.
    """
    merged = list(CPU)
    if num_classes is not None:
        merged += ["MODEL.HEADS.NUM_CLASSES", num_classes]
    if weights is not None:
        merged += ["MODEL.WEIGHTS", weights]
    merged += [*opts, *(x for kv in overrides.items() for x in kv)]
    if config_file is None:
        cfg = get_cfg()
        cfg.merge_from_list(merged)
        return cfg
    return setup_cfg(config_file, merged, freeze=False)


#: Overrides that shrink any paper's CPU config to a tiny SyntheticReID run (batch 8 = 4 x 2).
TINY_SYNTH = [
    "DATASETS.SYNTHETIC.NUM_TRAIN_IDS", "8", "DATASETS.SYNTHETIC.NUM_TEST_IDS", "8",
    "DATASETS.SYNTHETIC.NUM_CAMERAS", "2", "DATASETS.SYNTHETIC.IMAGES_PER_ID_PER_CAM", "2",
    "DATASETS.SYNTHETIC.HEIGHT", "64", "DATASETS.SYNTHETIC.WIDTH", "32",
    "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]",
    "SOLVER.IMS_PER_BATCH", "8", "DATALOADER.NUM_INSTANCE", "2", "DATALOADER.NUM_WORKERS", "0",
]  # fmt: skip


def fix_batch(trainer):
    """Make every training step of ``trainer`` see the same batch; returns that batch."""
    import itertools

    batch = next(iter(trainer.data_loader))
    trainer._trainer._data_loader_iter = itertools.repeat(batch)
    return batch


def run_steps(trainer, steps, terms=()):
    """Run ``steps`` training steps inside an EventStorage.

    Args:
        trainer (ReidTrainer)
        steps (int)
        terms (Iterable[str]): logged loss names to record after every step.
    Returns:
        tuple[list[float], list[dict[str, float]]]: total loss per step, and the ``terms``
        values per step.
    """
    from fastreid.utils.events import EventStorage

    totals, values = [], []
    with EventStorage(0) as storage:
        trainer.storage = storage
        for i in range(steps):
            trainer.iter = i
            trainer.run_step()
            totals.append(storage.history("total_loss").latest())
            values.append({k: storage.history(k).latest() for k in terms})
    return totals, values


#: Test set of the training identities written by :func:`write_training_ids_testset`.
TRAIN_IDS_TESTSET = ["DATASETS.TESTS", '("Market1501",)']
#: fast-reid's generic augmentations off: a few dozen iterations must show learning.
NO_AUGMENTATION = ["INPUT.REA.ENABLED", "False", "INPUT.FLIP.ENABLED", "False",
                   "INPUT.PADDING.ENABLED", "False"]  # fmt: skip


def write_training_ids_testset(cfg):
    """Write the training images of ``cfg``'s SyntheticReID as a Market-1501 test set beside it.

    The first image of every (identity, camera) is a query, the others are the gallery, so an
    evaluation asks for the cross-camera retrieval of the identities the model is trained on:
    what a few dozen iterations from random initialisation can learn (unseen identities need
    hundreds). An untrained network ranks by camera (illumination and background), below a
    random ranking. Select it with :data:`TRAIN_IDS_TESTSET`.

    Args:
        cfg (CfgNode): config whose ``DATASETS.NAMES`` is ``("SyntheticReID",)``.
    Returns:
        tuple[int, int]: number of query and gallery images.
    """
    import shutil

    from reidzoo.data.build import build_dataset
    from reidzoo.data.synthetic import parse_name

    data = build_dataset(cfg, "SyntheticReID")
    root = os.path.dirname(os.path.dirname(data.dataset_dir))
    base = os.path.join(root, "Market-1501-v15.09.15")
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    seen, counts = set(), {"query": 0, "bounding_box_test": 0}
    for name in sorted(os.listdir(data.train_dir)):
        pid, cam, _ = parse_name(name)
        sub = "bounding_box_test" if (pid, cam) in seen else "query"
        seen.add((pid, cam))
        shutil.copyfile(os.path.join(data.train_dir, name), os.path.join(base, sub, name))
        counts[sub] += 1
    return counts["query"], counts["bounding_box_test"]


def evaluate_on_training_ids(cfg, model):
    """Evaluate ``model`` on the :func:`write_training_ids_testset` set, as training does.

    Returns:
        dict: fast-reid's metrics (``mAP``, ``Rank-1``, ... in percent).
    """
    from reidzoo.engine import ReidTrainer

    cfg = cfg.clone()
    cfg.defrost()
    cfg.merge_from_list(TRAIN_IDS_TESTSET)
    return dict(ReidTrainer.test(cfg, model))


def train_then_eval_only(config_file, opts, out, iters):
    """Train ``iters`` iterations with train_net's ``main`` (the real loop and hooks) into
    ``out/run``, evaluating on the training identities at the end, then ``--eval-only`` its
    ``model_final.pth`` into ``out/eval``.

    Args:
        config_file (str)
        opts (list[str]): KEY VALUE overrides (dataset root, sizes, ...).
        out (pathlib.Path): a fresh folder.
        iters (int): training iterations (LR constant: no step before the end).
    Returns:
        tuple[dict, dict]: the ``results`` of the training-time ``results.json`` and of
        ``--eval-only``'s ``results_eval.json``.
    """
    import json

    from reidzoo.engine import default_argument_parser, main

    run, ev = str(out / "run"), str(out / "eval")
    schedule = ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"[{iters + 1}]",
                "SOLVER.WARMUP_ITERS", "0", "SOLVER.CHECKPOINT_PERIOD", str(iters),
                "TEST.EVAL_PERIOD", str(iters)]  # fmt: skip
    opts = [*opts, *NO_AUGMENTATION, *TRAIN_IDS_TESTSET, *schedule]
    main(default_argument_parser().parse_args(
        ["--config-file", config_file, *opts, "OUTPUT_DIR", run]))  # fmt: skip
    with open(os.path.join(run, "results.json")) as f:
        trained = json.load(f)
    main(default_argument_parser().parse_args(
        ["--config-file", config_file, "--eval-only", *opts, "OUTPUT_DIR", ev,
         "MODEL.WEIGHTS", os.path.join(run, "model_final.pth")]))  # fmt: skip
    with open(os.path.join(ev, "results_eval.json")) as f:
        evaluated = json.load(f)
    assert trained["datasets"] == evaluated["datasets"] == ["Market1501"]
    return trained["results"], evaluated["results"]


def site_packages():
    """Returns:
    str: this interpreter's site-packages folder (``purelib``)."""
    return sysconfig.get_paths()["purelib"]


def purelib(py):
    """Returns:
    str: the site-packages folder (``purelib``) of the interpreter ``py``."""
    return subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def bare_venv(path):
    """A venv that sees this environment's third-party packages (torch, fastreid) but not
    its editable reidzoo: its .pth adds the site-packages folder without processing it.

    Args:
        path (pathlib.Path): a folder that does not exist yet.
    Returns:
        str: the venv's python.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    py = str(path / "bin" / "python")
    with open(os.path.join(purelib(py), "zz_parent_env.pth"), "w") as f:
        f.write(site_packages() + "\n")
    return py


def perturbing_exporter(monkeypatch):
    """Make :mod:`reidzoo.export` write a graph whose conv weights are 5 % off the PyTorch
    model's (a genuinely wrong graph, for parity-failure tests); the model is restored after."""
    import torch

    from reidzoo import export

    real = export._torch_onnx_export

    def wrong_export(model, images, path, opset):
        params = [p for p in model.parameters() if p.dim() == 4]  # conv weights
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.mul_(1.05)
        try:
            real(model, images, path, opset)
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

    monkeypatch.setattr(export, "_torch_onnx_export", wrong_export)
