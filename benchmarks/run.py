"""Model costs: parameters, multiply-adds, CPU training-step time, inference throughput, memory.

Usage::

    python benchmarks/run.py [--models NAME ...] [--batch 8] [--steps 5] [--warmup 2] \\
        [--threads N] [--output results.json] [--markdown]

Every model named in :data:`MODELS` is measured in its own subprocess (so that its peak memory
is its own), one after the other, on this machine, at the input size of its config:

* ``params`` and ``macs``: :func:`reidzoo.complexity.count_complexity` on the eval model at
  ``INPUT.SIZE_TEST``, batch 1 (one multiply-add = one MAC; params include the classifier).
* ``train_step_s``: median wall time of ``--steps`` training steps after ``--warmup`` untimed
  ones, on one fixed random batch of ``--batch`` images (float 0-255 at ``INPUT.SIZE_TRAIN``)
  with P x K labels (K = ``DATALOADER.NUM_INSTANCE``). One step is what fast-reid's
  ``SimpleTrainer`` does: forward in train mode, sum of the model's own losses dict, backward,
  optimizer step (``SOLVER.OPT`` from fast-reid's ``build_optimizer``), inside an
  ``EventStorage``. No data loading or augmentation is timed.
* ``eager_img_s``: images per second of the PyTorch eval model under ``torch.no_grad()`` at
  batch ``--batch`` (median batch time, same warm-up and step counts).
* ``onnx_img_s``: the same for ONNX Runtime (CPU execution provider, as many intra-op threads as
  torch uses: ``--threads``, else torch's default) on the graph written by
  :func:`reidzoo.export.export_onnx`.
* ``openvino_img_s``: the same for OpenVINO (CPU plugin, fp32 inference as BoxMOT compiles it,
  ``--threads`` threads, one stream) on the IR written by :func:`reidzoo.export.export_openvino`;
  None, and no column in the table, when the optional ``openvino`` package is not installed.
* ``peak_rss_mib``: ``ru_maxrss`` of the measuring subprocess at the end (Python, torch,
  model, training, export and the inference runs together), in MiB.
* ``ratio_*``: each cost divided by the same cost of the model's baseline (from the registry)
  measured in the same run. For throughputs the ratio is of images/s (< 1 means slower).

A model's baseline is added to the run when it was not asked for. The JSON of all rows is
printed (or, with ``--markdown``, a Markdown table with the command, date and machine) and
written to ``--output`` when given. Nothing here asserts a number.

To add a model, add one line to :data:`MODELS`: name -> (config file relative to the repository
root, extra ``KEY VALUE`` overrides, baseline name). :data:`COMMON_OPTS` is applied to every model
before its own overrides.
"""

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

logger = logging.getLogger("benchmarks.run")


class Model(NamedTuple):
    """One registry entry.

    Attributes:
        config (str): config file, relative to the repository root.
        opts (tuple[str, ...]): ``KEY VALUE`` overrides applied after :data:`COMMON_OPTS`.
        baseline (str): registry name of the model the ratios are taken against (itself for a
            baseline). It must have the same test input size.
    """

    config: str
    opts: Tuple[str, ...]
    baseline: str


# Random initialisation (no weights can be downloaded), CPU, fp32, Market-1501's 751 ids.
COMMON_OPTS = (
    "MODEL.BACKBONE.PRETRAIN", "False",
    "MODEL.DEVICE", "cpu",
    "SOLVER.AMP.ENABLED", "False",
    "MODEL.HEADS.NUM_CLASSES", "751",
)  # fmt: skip


def size(height, width):
    """Overrides for training and test input size.

    Args:
        height (int)
        width (int)
    Returns:
        tuple[str, ...]: ``INPUT.SIZE_TRAIN`` and ``INPUT.SIZE_TEST`` set to [height, width].
    """
    value = f"[{height}, {width}]"
    return ("INPUT.SIZE_TRAIN", value, "INPUT.SIZE_TEST", value)


BAGTRICKS = "configs/Base-bagtricks.yml"
# fast-reid's MGN (meta_arch/mgn.py) slices fast-reid's own ResNet (conv1 ... layer4), so it needs
# build_resnet_backbone; its heads reduce to 256-d (fast-reid's Base-MGN.yml). Heads, losses and
# solver are the bag-of-tricks ones, as for the baselines.
MGN = ("MODEL.META_ARCHITECTURE", "MGN", "MODEL.BACKBONE.NAME", "build_resnet_backbone",
       "MODEL.HEADS.EMBEDDING_DIM", "256")  # fmt: skip
BASE_256 = "fastreid-baseline-256x128"
BASE_384 = "fastreid-baseline-384x128"
BASE_384x192 = "fastreid-baseline-384x192"
PAN_PLM = "pan-plm-baseline-384x128"
PMM_BDB = "pmm-bdb-layout-384x128"
PAN = "projects/PAN/configs/PAN_R50_Market1501.yml"
PFE = "projects/PFE/configs/PFE_R50_Market1501_stage{}.yml"
PMM = "projects/PMM/configs/PMM_R50_Market1501.yml"
# PAN's own baseline (Table 2 "Baseline"): PLM parts, no PAM connection, everything else equal.
NO_PAM = ("MODEL.PAN.PAM_STAGES", "[]", "MODEL.PAN.PAM_DIMS", "[]")
# PMM's baseline (the "BDB-style two-head model without Grad-CAM"): BDB's global + part
# branches with random batch drop in PMM's code (ablations/bdb_layout.yml), no Grad-CAM pass.
BDB = ("MODEL.PMM.LAYOUT", "bdb", "MODEL.PMM.MIX", "bdb")

# name -> (config, extra KEY VALUE overrides, baseline name); one line per model.
MODELS = {
    BASE_256: Model(BAGTRICKS, size(256, 128), BASE_256),
    BASE_384: Model(BAGTRICKS, size(384, 128), BASE_384),
    "fastreid-mgn-384x128": Model(BAGTRICKS, MGN + size(384, 128), BASE_384),
    BASE_384x192: Model(BAGTRICKS, size(384, 192), BASE_384x192),
    "ianet-256x128": Model("projects/IANet/configs/IANet_R50_Market1501.yml", (), BASE_256),
    PAN_PLM: Model(PAN, NO_PAM, PAN_PLM),
    "pan-384x128": Model(PAN, (), PAN_PLM),
    "pfe-stage1-384x192": Model(PFE.format(1), (), BASE_384x192),
    "pfe-stage2-384x192": Model(PFE.format(2), (), BASE_384x192),
    PMM_BDB: Model(PMM, BDB, PMM_BDB),
    "pmm-384x128": Model(PMM, (), PMM_BDB),
    "rmgl-384x128": Model("projects/RMGL/configs/RMGL_R50_Market1501.yml", (), BASE_384),
}

# The real-data pairs (configs/Pairs/, benchmarks/REAL_DATA.md): ResNet-18 at 192x64, each
# method against its own base, with the pairs' P 16 x K 2 (run them with --batch 32).
PAIRS = {
    "pairs-bot-baseline": ("baseline.yml", "pairs-bot-baseline"),
    "pairs-ianet-base": ("IANet/base.yml", "pairs-ianet-base"),
    "pairs-ianet": ("IANet/ianet.yml", "pairs-ianet-base"),
    "pairs-ianet-renorm": ("IANet/ianet_renorm.yml", "pairs-ianet-base"),
    "pairs-pan-base": ("PAN/base.yml", "pairs-pan-base"),
    "pairs-pan": ("PAN/pan.yml", "pairs-pan-base"),
    "pairs-pfe-base": ("PFE/base.yml", "pairs-pfe-base"),
    "pairs-pfe-stage1": ("PFE/stage1.yml", "pairs-pfe-base"),
    "pairs-pfe-stage2": ("PFE/stage2.yml", "pairs-pfe-base"),
    "pairs-pmm-base": ("PMM/base.yml", "pairs-pmm-base"),
    "pairs-pmm": ("PMM/pmm.yml", "pairs-pmm-base"),
    "pairs-pmm-no-mix": ("PMM/pmm_no_mix.yml", "pairs-pmm-base"),
    "pairs-rmgl-base": ("RMGL/base.yml", "pairs-rmgl-base"),
    "pairs-rmgl": ("RMGL/rmgl.yml", "pairs-rmgl-base"),
}
MODELS.update(
    {name: Model("configs/Pairs/" + cfg, (), base) for name, (cfg, base) in PAIRS.items()}
)

# The default run is the papers' settings; the pairs are asked for by name.
DEFAULT_MODELS = [name for name in MODELS if name not in PAIRS]

# (JSON key of a cost, True when larger is better) for the ratios.
RATIO_KEYS = (
    ("params", False),
    ("macs", False),
    ("train_step_s", False),
    ("eager_img_s", True),
    ("onnx_img_s", True),
    ("openvino_img_s", True),
    ("peak_rss_mib", False),
)


def _median_time(fn, steps, warmup):
    """Call ``fn`` ``warmup`` times untimed, then ``steps`` times timed.

    Returns:
        list[float]: the timed durations in seconds.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def pk_labels(batch, num_instance):
    """P x K identity labels: P = batch / K identities, K images each.

    Args:
        batch (int): batch size, a multiple of ``num_instance``.
        num_instance (int): K.
    Returns:
        Tensor: int64 [batch], ``[0]*K + [1]*K + ...``.
    Raises:
        ValueError: ``batch`` is not a positive multiple of K, or P < 2 (no negatives for
            a triplet loss).
    """
    import torch

    if num_instance < 1 or batch % num_instance or batch // num_instance < 2:
        raise ValueError(
            f"--batch {batch} must be a multiple of DATALOADER.NUM_INSTANCE (K={num_instance}) "
            "with at least 2 identities"
        )
    return torch.arange(batch // num_instance).repeat_interleave(num_instance)


def measure(config_file, opts=(), batch=8, steps=5, warmup=2, name=None, threads=None):
    """Measure one model in this process.

    Args:
        config_file (str): config YAML (absolute, or relative to the current directory).
        opts (Sequence[str]): ``KEY VALUE`` overrides (not including :data:`COMMON_OPTS`).
        batch (int): images per training step and per inference batch.
        steps (int): timed repetitions (>= 1).
        warmup (int): untimed repetitions before them (>= 0).
        name (str | None): row name; defaults to the config file name.
        threads (int | None): torch intra-op threads (``torch.set_num_threads``), also used for
            ONNX Runtime; None keeps torch's default.
    Returns:
        dict: one row: ``model``, ``config``, ``opts``, ``input`` ([H, W] test size),
        ``input_train``, ``batch``, ``pk`` ([P, K]), ``params``, ``macs``, ``uncounted_ops``,
        ``train_step_s`` (median), ``train_step_times``, ``train_step_min_s``, ``losses`` (name
        -> last value), ``eager_img_s``, ``eager_batch_times``, ``onnx_img_s``,
        ``onnx_batch_times``, ``onnx_parity_rel``, ``openvino_img_s``, ``openvino_batch_times``,
        ``openvino_parity_rel`` (the three None without openvino), ``threads``,
        ``peak_rss_mib``.
    """
    import numpy as np
    import onnxruntime as ort
    import torch
    from fastreid.solver import build_optimizer
    from fastreid.utils.events import EventStorage

    from reidzoo.complexity import count_complexity
    from reidzoo.config import setup_cfg
    from reidzoo.export import INPUT_NAME, OUTPUT_NAME, export_onnx
    from reidzoo.modeling.build import build_eval_model

    if steps < 1 or warmup < 0 or batch < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0, batch >= 1; got {steps}/{warmup}/{batch}")
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    cfg = setup_cfg(config_file, list(opts))
    test_hw = [int(v) for v in cfg.INPUT.SIZE_TEST]
    train_hw = [int(v) for v in cfg.INPUT.SIZE_TRAIN]
    model = build_eval_model(cfg, load_weights=False)
    gen = torch.Generator().manual_seed(0)

    cost = count_complexity(model, test_hw)

    # training step, as fast-reid's SimpleTrainer.run_step
    targets = pk_labels(batch, int(cfg.DATALOADER.NUM_INSTANCE))
    images = torch.rand(batch, 3, *train_hw, generator=gen) * 255.0
    data = {"images": images, "targets": targets}
    optimizer, _ = build_optimizer(cfg, model, contiguous=False)
    model.train()
    last = {}

    def train_step():
        loss_dict = model(data)
        losses = sum(loss_dict.values())
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()
        last.update({k: float(v.detach()) for k, v in loss_dict.items()})

    with EventStorage(0):
        train_times = _median_time(train_step, steps, warmup)

    # inference: PyTorch eager
    model.eval()
    test_images = torch.rand(batch, 3, *test_hw, generator=gen) * 255.0

    def eager():
        with torch.no_grad():
            model(test_images)

    eager_times = _median_time(eager, steps, warmup)

    # inference: ONNX Runtime on the exported graph
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="reidzoo-bench-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        parity = export_onnx(model, path, test_hw, batch=batch, tol=None)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        feed = {INPUT_NAME: test_images.numpy().astype(np.float32)}
        onnx_times = _median_time(lambda: session.run([OUTPUT_NAME], feed), steps, warmup)
    if not parity["rel"] <= 1e-4:
        logger.warning("%s: ONNX parity rel %.3g > 1e-4", name or config_file, parity["rel"])
    openvino = measure_openvino(model, test_hw, test_images, batch, steps, warmup, threads)
    if openvino["openvino_parity_rel"] is not None and not openvino["openvino_parity_rel"] <= 1e-4:
        logger.warning("%s: OpenVINO parity rel %.3g > 1e-4", name or config_file,
                       openvino["openvino_parity_rel"])  # fmt: skip

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "model": name or os.path.basename(config_file),
        "config": os.path.relpath(os.path.abspath(config_file), REPO),
        "opts": list(opts),
        "input": test_hw,
        "input_train": train_hw,
        "batch": batch,
        "pk": [batch // int(cfg.DATALOADER.NUM_INSTANCE), int(cfg.DATALOADER.NUM_INSTANCE)],
        "params": int(cost["params"]),
        "macs": int(cost["macs"]),
        "uncounted_ops": cost["unsupported_ops"],
        "train_step_s": statistics.median(train_times),
        "train_step_times": train_times,
        "train_step_min_s": min(train_times),
        "losses": last,
        "eager_img_s": batch / statistics.median(eager_times),
        "eager_batch_times": eager_times,
        "onnx_img_s": batch / statistics.median(onnx_times),
        "onnx_batch_times": onnx_times,
        "onnx_parity_rel": float(parity["rel"]),
        **openvino,
        "threads": threads,
        "peak_rss_mib": peak_kib / 1024.0,
    }


def measure_openvino(model, test_hw, test_images, batch, steps, warmup, threads):
    """OpenVINO throughput of ``model``'s IR at batch ``batch``, or Nones without openvino.

    Args:
        model (nn.Module): the eval model.
        test_hw (Sequence[int]): (H, W).
        test_images (Tensor): [batch, 3, H, W] float 0-255.
        batch, steps, warmup (int): as :func:`measure`.
        threads (int): inference threads.
    Returns:
        dict: ``openvino_img_s`` (float | None), ``openvino_batch_times`` (list[float] | None),
        ``openvino_parity_rel`` (float | None).
    """
    try:
        import openvino as ov
    except ImportError:
        return {"openvino_img_s": None, "openvino_batch_times": None, "openvino_parity_rel": None}
    from reidzoo.export import OPENVINO_XML, export_openvino

    with tempfile.TemporaryDirectory(prefix="reidzoo-bench-") as tmp:
        folder = os.path.join(tmp, "model_openvino_model")
        parity = export_openvino(model, folder, test_hw, batch=batch, tol=None)
        config = {
            "INFERENCE_PRECISION_HINT": "f32",  # as BoxMOT; the bf16 default drifts ~1e-2
            "INFERENCE_NUM_THREADS": int(threads),
            "NUM_STREAMS": 1,
        }
        compiled = ov.Core().compile_model(os.path.join(folder, OPENVINO_XML), "CPU", config)
        feed = test_images.numpy()
        times = _median_time(lambda: compiled([feed]), steps, warmup)
    return {
        "openvino_img_s": batch / statistics.median(times),
        "openvino_batch_times": times,
        "openvino_parity_rel": float(parity["rel"]),
    }


def resolve_models(names):
    """The models to run: ``names`` in order, then any baseline they need that is missing.

    Args:
        names (Sequence[str]): registry names.
    Returns:
        list[str]
    Raises:
        KeyError: a name is not in :data:`MODELS` (the message lists the registered ones).
    """
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise KeyError(f"unknown model(s) {unknown}; registered: {', '.join(MODELS)}")
    out = list(dict.fromkeys(names))
    for n in list(out):
        if MODELS[n].baseline not in out:
            logger.warning("adding %s, the baseline of %s", MODELS[n].baseline, n)
            out.append(MODELS[n].baseline)
    return out


def add_ratios(rows):
    """Add ``baseline`` and ``ratio_<cost>`` to every row whose baseline row is present.

    Args:
        rows (list[dict]): rows of :func:`measure` (modified in place); failed rows carry
            ``error`` and get no ratios.
    Returns:
        list[dict]: ``rows``.
    """
    by_name = {r["model"]: r for r in rows}
    for row in rows:
        base = by_name.get(MODELS[row["model"]].baseline) if row["model"] in MODELS else None
        row["baseline"] = base["model"] if base else None
        for key, _ in RATIO_KEYS:
            ok = base is not None and "error" not in row and "error" not in base
            if ok and base["input"] != row["input"]:
                logger.warning("%s: baseline has another input size", row["model"])
                ok = False
            ok = ok and row.get(key) is not None and bool(base.get(key))
            row[f"ratio_{key}"] = row[key] / base[key] if ok else None
    return rows


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info():
    """Returns:
    dict: ``nproc``, ``cpu``, ``torch``, ``onnxruntime``, ``openvino`` (None when not
    installed), ``python``, ``torch_threads``."""
    import onnxruntime
    import torch

    try:
        import openvino

        openvino_version = str(openvino.__version__)
    except ImportError:
        openvino_version = None
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino_version,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }


def _load():
    return [round(v, 2) for v in os.getloadavg()]


def _fmt(value, spec, ratio=None):
    if value is None:
        return "n/a"
    text = format(value, spec)
    return text if ratio is None else f"{text} ({ratio:.2f}x)"


def _ratio(value):
    return "n/a" if value is None else f"{value:.2f}x"


def format_markdown(report):
    """The Markdown table of a report, with its command, date and machine lines.

    Args:
        report (dict): as written by :func:`main`.
    Returns:
        str
    """
    batch = report["batch"]
    m = report["machine"]
    # the OpenVINO column only when some row measured it (openvino is an optional extra)
    with_ov = any(r.get("openvino_img_s") is not None for r in report["rows"])
    ov_head, ov_rule = (" OpenVINO img/s |", "---|") if with_ov else ("", "")
    lines = [
        f"| model | input | params (M) | MACs (G) | ratio MACs | train step s (batch {batch}) "
        f"| ratio | eager img/s | ONNX img/s |{ov_head} peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|" + ov_rule + "---|",
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error']} |" + " |" * (9 if with_ov else 8))
            continue
        h, w = r["input"]
        ov_cell = (
            f"| {_fmt(r.get('openvino_img_s'), '.1f', r.get('ratio_openvino_img_s'))} "
            if with_ov
            else ""
        )
        lines.append(
            f"| {r['model']} | {h}x{w} "
            f"| {_fmt(r['params'] / 1e6, '.2f', r['ratio_params'])} "
            f"| {r['macs'] / 1e9:.2f} | {_ratio(r['ratio_macs'])} "
            f"| {r['train_step_s']:.2f} | {_ratio(r['ratio_train_step_s'])} "
            f"| {_fmt(r['eager_img_s'], '.1f', r['ratio_eager_img_s'])} "
            f"| {_fmt(r['onnx_img_s'], '.1f', r['ratio_onnx_img_s'])} "
            + ov_cell
            + f"| {_fmt(r['peak_rss_mib'], '.0f', r['ratio_peak_rss_mib'])} |"
        )
    lines.append("")
    lines.append(
        "Ratios (in parentheses for params, throughputs and memory) are to the row's baseline: "
        + "; ".join(f"{r['model']} -> {r.get('baseline')}" for r in report["rows"])
        + ". Throughput ratios are of images/s (< 1 is slower)."
    )
    uncounted = {op for r in report["rows"] for op in (r.get("uncounted_ops") or {})}
    if uncounted:
        ops = ", ".join(sorted(uncounted))
        lines.append(f"MACs leave out operators fvcore cannot count: {ops}.")
    lines += [
        "",
        f"- command: `{report['command']}`",
        f"- date: {report['date']}",
        f"- machine: nproc {m['nproc']}, CPU {m['cpu']}, torch {m['torch']} "
        f"({m['torch_threads']} threads), onnxruntime {m['onnxruntime']}, "
        + (f"OpenVINO {m['openvino']}, " if m.get("openvino") else "")
        + f"Python {m['python']}",
        f"- load average (1, 5, 15 min) before: {report['load_before']}, "
        f"after: {report['load_after']}",
        "- load average (1 min) at each model's start -> end: "
        + "; ".join(
            f"{r['model']} {r['load_start'][0]} -> {r['load_end'][0]}"
            for r in report["rows"]
            if "load_start" in r
        ),
        "- spread of the timed training steps, min-max s (a wide one means the run was disturbed): "
        + "; ".join(
            f"{r['model']} {min(r['train_step_times']):.2f}-{max(r['train_step_times']):.2f}"
            for r in report["rows"]
            if "train_step_times" in r
        ),
        f"- {report['steps']} timed steps after {report['warmup']} warm-up steps; median; "
        f"wall time of the whole run {report['wall_s']:.0f} s",
    ]
    return "\n".join(lines)


def _run_worker(name, args):
    """Measure ``name`` in a fresh subprocess; returns its row (or one with ``error``)."""
    with tempfile.TemporaryDirectory(prefix="reidzoo-bench-") as tmp:
        out = os.path.join(tmp, "row.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--row-output", out]
        for flag in ("batch", "steps", "warmup", "threads"):
            cmd += [f"--{flag}", str(getattr(args, flag))]
        start, load_start = time.perf_counter(), _load()
        proc = subprocess.run(cmd, cwd=REPO)
        if proc.returncode != 0 or not os.path.isfile(out):
            return {"model": name, "error": f"worker exited with status {proc.returncode}"}
        with open(out) as f:
            row = json.load(f)
        row["worker_wall_s"] = time.perf_counter() - start
        row["load_start"], row["load_end"] = load_start, _load()
        return row


def _parser():
    p = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Measure parameters, MACs, CPU training-step time, inference throughput "
        "(PyTorch eager and ONNX Runtime) and peak memory of registered models.",
    )
    p.add_argument(
        "--models", nargs="+", default=DEFAULT_MODELS, metavar="NAME",
        help=f"registry names (default: all): {', '.join(MODELS)}",
    )  # fmt: skip
    p.add_argument("--batch", type=int, default=8, help="images per step/batch (default 8)")
    p.add_argument("--steps", type=int, default=5, help="timed repetitions (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed repetitions first (default 2)")
    p.add_argument(
        "--threads", type=int, default=0,
        help="torch and ONNX Runtime intra-op threads (default 0: torch's default)",
    )  # fmt: skip
    p.add_argument("--output", metavar="FILE.json", help="also write the JSON report here")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table, not JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--row-output", help=argparse.SUPPRESS)
    return p


def main(argv=None):
    """Command-line entry point.

    Args:
        argv (list[str] | None): arguments without the program name; None reads ``sys.argv``.
    Returns:
        int: 0 when every model was measured, 1 otherwise.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.worker:
        spec = MODELS[args.worker]
        row = measure(
            os.path.join(REPO, spec.config),
            COMMON_OPTS + tuple(spec.opts),
            batch=args.batch,
            steps=args.steps,
            warmup=args.warmup,
            name=args.worker,
            threads=args.threads or None,
        )
        with open(args.row_output, "w") as f:
            json.dump(row, f)
        return 0

    try:
        names = resolve_models(args.models)
    except KeyError as e:
        _parser().error(e.args[0])
    load_before, start = _load(), time.perf_counter()
    rows = []
    for name in names:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows.append(_run_worker(name, args))
    machine = machine_info()
    used = sorted({r["threads"] for r in rows if "threads" in r})
    if used:  # what the workers ran with (--threads, else torch's default there)
        machine["torch_threads"] = used[0] if len(used) == 1 else used
    report = {
        "command": "python benchmarks/run.py " + shlex.join(argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "load_before": load_before,
        "load_after": _load(),
        "wall_s": time.perf_counter() - start,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "rows": add_ratios(rows),
    }
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    print(format_markdown(report) if args.markdown else json.dumps(report, indent=2))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
