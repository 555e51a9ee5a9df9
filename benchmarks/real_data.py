"""Real-data evidence: the baseline and the five papers on VIPeR and PRID 450S, one shared budget.

Usage::

    # train (model, dataset, split) cells one after the other; prints each train_net.py command
    python benchmarks/real_data.py run --models baseline ianet --datasets viper prid450s \\
        [--splits 0 1 ...] [--root ../shared/data] [--logs logs/realdata] [--update-md FILE] \\
        [--dry-run] [--force] [-- KEY VALUE ...]
    # collect the finished cells into a Markdown table (stdout, or into FILE between markers)
    python benchmarks/real_data.py collect [--records benchmarks/real_data] [--update-md FILE]

Every model starts from random initialisation. The shared budget (solver, schedule, epochs,
batch, P x K sampler, input size, augmentation) is ``configs/RealData/Base-realdata.yml``; each
model's leaf ``configs/RealData/<model>.yml`` adds only the model (the paper's ``MODEL.*`` node,
losses, architecture, test metric) and the augmentation the paper itself adds. The dataset and
split are command-line overrides, so that every cell of a row runs the same file.

A cell's output folder is ``<logs>/<model>/<dataset>/split_<k>``; a multi-stage model (PFE) runs
its stages in ``.../split_<k>/stage<i>`` and the last stage's results count. Next to the results
``run_info.json`` records the commands, the wall time and the machine. Training outputs
(checkpoints, logs) stay under ``logs/``, which git ignores; what a finished cell proves goes into
a small tracked *record*, ``<records>/<model>/<dataset>/split_<k>.json`` (default records folder
``benchmarks/real_data``; ``--variant r50`` puts logs and records in an ``r50`` subfolder): the
final metrics, every evaluation during training, the commands, wall times, the machine and the
git revision. A cell with a record is skipped unless ``--force``, so a run can be resumed on a
fresh checkout and the table survives the logs.

``collect`` reads the records and reports, per (model, dataset), the mean +- sample standard
deviation (ddof=1; 0 for a single split) of rank-1/5/10 and mAP over the splits present, their
number, the mean wall time of one run (all stages), the machine and the git revisions; then one
line per run with every evaluation during its training. Nothing here asserts a number.
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from typing import NamedTuple, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join("configs", "RealData")
RECORDS = os.path.join(REPO, "benchmarks", "real_data")
METRICS = ("Rank-1", "Rank-5", "Rank-10", "mAP")
BEGIN_MARK = "<!-- real_data:begin -->"
END_MARK = "<!-- real_data:end -->"


class Stage(NamedTuple):
    """One training run of a model.

    Attributes:
        config (str): leaf config, relative to the repository root.
        weights_from (str | None): name of an earlier stage whose ``model_final.pth`` is
            loaded as ``MODEL.WEIGHTS``.
    """

    config: str
    weights_from: object = None


#: model name -> (display name, stages). The last stage's results are the model's.
MODELS = {
    "baseline": ("fast-reid BoT baseline", (Stage("baseline.yml"),)),
    "ianet": ("IANet", (Stage("IANet.yml"),)),
    "pan": ("PAN", (Stage("PAN.yml"),)),
    "pfe": ("PFE (stage I + II)", (Stage("PFE_stage1.yml"), Stage("PFE_stage2.yml", "stage1"))),
    "pmm": ("PMM", (Stage("PMM.yml"),)),
    "rmgl": ("RMGL", (Stage("RMGL.yml"),)),
}

#: backbone variant -> (records / logs subfolder, overrides applied before the command line's,
#: heading in the report). The shared budget's own ResNet-18 is at the top of both folders.
VARIANTS = {
    "r18": ("", (), "ResNet-18 (the shared budget)"),
    "r50": (
        "r50",
        ("MODEL.BACKBONE.DEPTH", "50x", "MODEL.BACKBONE.FEAT_DIM", "2048"),
        "ResNet-50 (the shared budget with `MODEL.BACKBONE.DEPTH 50x`, nothing else changed)",
    ),
}

#: dataset short name -> fast-reid dataset name. Any other registered dataset (a plugin's
#: included) is given by its registry name (:func:`registry_name`).
DATASETS = {"viper": "VIPeRSingleShot", "prid450s": "PRID450S"}


def registry_name(dataset):
    """The registry name of a dataset given by short name or by registry name.

    Args:
        dataset (str): a key of :data:`DATASETS`, or a name in fast-reid's ``DATASET_REGISTRY``
            registered by reidzoo or by a plugin (imported, through its entry point, only if
            nothing loaded has the name).
    Returns:
        str
    Raises:
        KeyError: neither (the message lists the short names and the registered datasets).
    """
    if dataset in DATASETS:
        return DATASETS[dataset]
    from reidzoo.plugins import load_core, lookup  # imports torch: only for a registry name
    from reidzoo.registry import DATASET_REGISTRY

    load_core()
    try:
        lookup(DATASET_REGISTRY, dataset, "--datasets")
    except KeyError as e:
        message = f"unknown dataset '{dataset}'; short names: {sorted(DATASETS)}; {e.args[0]}"
        raise KeyError(message) from None
    return dataset


def ordered_datasets(names):
    """``names`` with the :data:`DATASETS` keys first, in that order, then the others sorted."""
    names = set(names)
    return [d for d in DATASETS if d in names] + sorted(names - set(DATASETS))


#: The method-vs-own-base pairs (benchmarks/REAL_DATA.md, "Pairs"): configs under
#: ``configs/Pairs/``, one budget file per pair (``<Paper>/base.yml``, the paper's own base) and
#: leaves that add only the paper's addition. Cell name -> (display name, stages).
PAIRS_CONFIG_DIR = os.path.join("configs", "Pairs")
PAIR_MODELS = {
    "bot": ("fast-reid BoT baseline (reference)", (Stage("baseline.yml"),)),
    "ianet-base": ("IANet base (no IA block, Tab. 4)", (Stage("IANet/base.yml"),)),
    "ianet": ("IANet", (Stage("IANet/ianet.yml"),)),
    "ianet-renorm": ("IANet, FUSION_NORM renorm", (Stage("IANet/ianet_renorm.yml"),)),
    "pan-base": ("PAN PLM baseline (no PAM, Tab. 2)", (Stage("PAN/base.yml"),)),
    "pan": ("PAN", (Stage("PAN/pan.yml"),)),
    "pan-base-softplus": (
        "PAN PLM baseline, softplus masks (tried)",
        (Stage("PAN/base_softplus.yml"),),
    ),
    "pan-softplus": ("PAN, softplus masks (tried)", (Stage("PAN/pan_softplus.yml"),)),
    "pfe-base": ("PFE ResNet baseline (no TSAM, Tab. I)", (Stage("PFE/base.yml"),)),
    "pfe": (
        "PFE (stage I + II)",
        (Stage("PFE/stage1.yml"), Stage("PFE/stage2.yml", "stage1")),
    ),
    "pfe-init3": (
        "PFE stage I, TSAM masks start near 1 (tried)",
        (Stage("PFE/stage1_init3.yml"),),
    ),
    "pmm-base": ("PMM base (BDB layout)", (Stage("PMM/base.yml"),)),
    "pmm-no-mix": ("PMM without mixing", (Stage("PMM/pmm_no_mix.yml"),)),
    "pmm": ("PMM", (Stage("PMM/pmm.yml"),)),
    "rmgl-base": ("RMGL BL (Tab. V)", (Stage("RMGL/base.yml"),)),
    "rmgl": ("RMGL (+RP +ABP +RSA)", (Stage("RMGL/rmgl.yml"),)),
}

#: What each pair tests: (paper, what is added, (method cell, view), (base cell, view)). A view
#: is ``"final"`` (the cell's last stage, the paper's test feature), ``"stage1"`` (the first
#: stage's results) or a metric group of the last stage (``"F5"``, ``"side"``: PFE stage II).
COMPARISONS = (
    ("IANet", "IA blocks", ("ianet", "final"), ("ianet-base", "final")),
    ("IANet", "IA blocks, renorm fusion", ("ianet-renorm", "final"), ("ianet-base", "final")),
    ("PAN", "PAM", ("pan", "final"), ("pan-base", "final")),
    (
        "PAN",
        "PAM, both cells with softplus masks (tried, not the paper's)",
        ("pan-softplus", "final"),
        ("pan-base-softplus", "final"),
    ),
    ("PFE", "TSAM (stage I)", ("pfe", "stage1"), ("pfe-base", "final")),
    ("PFE", "stage I + II, concatenation", ("pfe", "final"), ("pfe-base", "final")),
    ("PFE", "stage II over stage I", ("pfe", "final"), ("pfe", "stage1")),
    ("PFE", "stage II: F5 alone vs stage I", ("pfe", "F5"), ("pfe", "stage1")),
    ("PFE", "stage II: side alone vs stage I", ("pfe", "side"), ("pfe", "stage1")),
    (
        "PFE",
        "TSAM with masks starting near 1 (tried, not the paper's)",
        ("pfe-init3", "final"),
        ("pfe-base", "final"),
    ),
    ("PMM", "progressive stages + hard-mix", ("pmm", "final"), ("pmm-base", "final")),
    ("PMM", "hard-mix alone", ("pmm", "final"), ("pmm-no-mix", "final")),
    ("RMGL", "RP + ABP + RSA", ("rmgl", "final"), ("rmgl-base", "final")),
)

#: Cost rows of ``benchmarks/run.py`` (``pairs-*`` models) for each (cell, view).
COST_MODELS = {
    ("bot", "final"): "pairs-bot-baseline",
    ("ianet-base", "final"): "pairs-ianet-base",
    ("ianet", "final"): "pairs-ianet",
    ("ianet-renorm", "final"): "pairs-ianet-renorm",
    ("pan-base", "final"): "pairs-pan-base",
    ("pan", "final"): "pairs-pan",
    # softplus for ReLU: the same parameters, a negligible cost
    ("pan-base-softplus", "final"): "pairs-pan-base",
    ("pan-softplus", "final"): "pairs-pan",
    ("pfe-base", "final"): "pairs-pfe-base",
    ("pfe", "stage1"): "pairs-pfe-stage1",
    ("pfe", "final"): "pairs-pfe-stage2",
    ("pfe", "F5"): "pairs-pfe-stage2",
    ("pfe", "side"): "pairs-pfe-stage2",
    ("pfe-init3", "final"): "pairs-pfe-stage1",  # the same network, another initialisation
    ("pmm-base", "final"): "pairs-pmm-base",
    ("pmm-no-mix", "final"): "pairs-pmm-no-mix",
    ("pmm", "final"): "pairs-pmm",
    ("rmgl-base", "final"): "pairs-rmgl-base",
    ("rmgl", "final"): "pairs-rmgl",
}

#: suite -> (config folder, models, records subfolder, logs subfolder, Markdown markers).
SUITES = {
    "league": (CONFIG_DIR, MODELS, "", "", ("<!-- real_data:begin -->", "<!-- real_data:end -->")),
    "pairs": (
        PAIRS_CONFIG_DIR,
        PAIR_MODELS,
        "pairs",
        "pairs",
        ("<!-- pairs:begin -->", "<!-- pairs:end -->"),
    ),
}


def stage_name(i, n):
    """Folder name of stage ``i`` (0-based) of ``n``: ``""`` for a single-stage model."""
    return "" if n == 1 else f"stage{i + 1}"


def cell_dir(logs, model, dataset, split):
    """Output folder of one (model, dataset, split) cell."""
    return os.path.join(logs, model, dataset, f"split_{split}")


def build_commands(
    model,
    dataset,
    split,
    root,
    logs,
    python=sys.executable,
    extra=(),
    models=MODELS,
    config_dir=CONFIG_DIR,
):
    """The ``train_net.py`` commands of one cell, one per stage.

    Args:
        model (str): key of :data:`MODELS`.
        dataset (str): key of :data:`DATASETS`.
        split (int): split index (0-9).
        root (str): dataset root (``DATASETS.ROOT``).
        logs (str): root of the output folders.
        python (str): interpreter.
        extra (Sequence[str]): further ``KEY VALUE`` overrides, applied last.
        models (dict): :data:`MODELS` or :data:`PAIR_MODELS`.
        config_dir (str): folder of ``models``' configs, relative to the repository root.
    Returns:
        list[tuple[list[str], str]]: ``(argv, output_dir)`` per stage, in order.
    """
    if model not in models:
        raise KeyError(f"unknown model '{model}'; known: {sorted(models)}")
    name = registry_name(dataset)
    stages = models[model][1]
    base = cell_dir(logs, model, dataset, split)
    out_dirs = {}
    commands = []
    for i, stage in enumerate(stages):
        sname = stage_name(i, len(stages))
        out = os.path.join(base, sname) if sname else base
        out_dirs[sname] = out
        argv = [python, "train_net.py", "--config-file", os.path.join(config_dir, stage.config)]
        # A cell runs again only when it has no record (failed, or --force): its old outputs
        # move to <folder>.replaced-<time> instead of blocking it.
        argv += ["--overwrite"]
        argv += [
            "DATASETS.NAMES", f'("{name}",)',
            "DATASETS.TESTS", f'("{name}",)',
            "DATASETS.ROOT", root,
            "DATASETS.SPLIT_INDEX", str(split),
            "OUTPUT_DIR", out,
        ]  # fmt: skip
        if stage.weights_from:
            argv += ["MODEL.WEIGHTS", os.path.join(out_dirs[stage.weights_from], "model_final.pth")]
        argv += list(extra)
        commands.append((argv, out))
    return commands


def machine_info():
    """nproc, CPU model, torch version, Python, platform and the load average now."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # pragma: no cover - the project always has torch
        torch_version = "n/a"
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "torch": torch_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def record_path(records, model, dataset, split):
    """Tracked record of one finished cell."""
    return os.path.join(records, model, dataset, f"split_{split}.json")


#: What a run depends on: uncommitted changes here make a record "dirty" (documentation,
#: including the table this script rewrites, does not).
CODE_PATHS = (
    "reidzoo",
    "projects",
    "configs",
    "train_net.py",
    "setup.py",
    "benchmarks/real_data.py",
)


def git_revision():
    """``{"rev": HEAD, "dirty": bool}`` of the repository (dirty: uncommitted changes under
    :data:`CODE_PATHS`), or None outside a git checkout."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"rev": rev, "dirty": bool(status.strip())}


def _metrics_entries(output_dir):
    """The JSON objects of fast-reid's ``metrics.json`` in ``output_dir`` (one per line, written
    by its ``JSONWriter``); nothing for a missing file, unparsable lines skipped."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except ValueError:
                continue


def evaluations(output_dir):
    """Every evaluation a run logged: ``[{"iteration": i, metric: value, ...}]``.

    Read from fast-reid's ``metrics.json`` (:func:`_metrics_entries`; evaluation scalars are
    named ``<metric>`` or ``<dataset>/<metric>``). Missing file or unparsable lines: what could
    be read.
    """
    found = []
    for entry in _metrics_entries(output_dir):
        values = {}
        for key, value in entry.items():
            parts = key.split("/")
            # "<metric>" or "<dataset>/<metric>"; a metric group ("<dataset>/F5/<metric>",
            # PFE stage II) is not the model's test feature
            if parts[-1] in METRICS and len(parts) <= 2:
                values[parts[-1]] = float(value)
        if len(values) == len(METRICS):
            found.append({"iteration": int(entry.get("iteration", -1)), **values})
    return found


def diagnostics(output_dir):
    """The training diagnostics a run logged (``REIDZOO.DIAGNOSTICS.ENABLED``; README "Training
    diagnostics"): ``{"first": {...}, "last": {...}}``, each the ``iteration`` and ``diag/...``
    values of the first and the last ``metrics.json`` line that has them; ``{}`` when none.
    """
    found = []
    for entry in _metrics_entries(output_dir):
        values = {k: float(v) for k, v in entry.items() if k.startswith("diag/")}
        if values:
            found.append({"iteration": int(entry.get("iteration", -1)), **values})
    return {"first": found[0], "last": found[-1]} if found else {}


def _write_text(path, text):
    """Write ``text`` to ``path`` atomically (:func:`reidzoo.checkpoint.atomic_write`)."""
    from reidzoo.checkpoint import atomic_write  # imports torch: only when writing

    atomic_write(path, lambda f: f.write(text), mode="w")


def _write_json(path, payload):
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    _write_text(path, json.dumps(payload, indent=2) + "\n")


def run_cell(
    model,
    dataset,
    split,
    root,
    logs,
    extra=(),
    dry_run=False,
    force=False,
    records=RECORDS,
    suite="league",
    keep_checkpoints=False,
):
    """Train one cell (all its stages), write ``run_info.json`` into its folder and, when every
    stage succeeded, the cell's record (:func:`record_path`).

    Once a cell's record is written its ``*.pth`` checkpoints are deleted (a ResNet-18 cell leaves
    about 390 MB of them, a whole pairs table over 30 GB) unless ``keep_checkpoints``; logs,
    ``metrics.json``, ``results.json`` and the configs stay. A failed cell keeps everything, for
    resuming or inspecting it.

    Returns:
        str: ``"done"``, ``"skipped"`` (a record exists), ``"dry-run"`` or ``"failed"``.
    """
    config_dir, models = SUITES[suite][:2]
    commands = build_commands(
        model, dataset, split, root, logs, extra=extra, models=models, config_dir=config_dir
    )
    final_out = commands[-1][1]
    for argv, _ in commands:
        print("$ " + shlex.join(argv), flush=True)
    if dry_run:
        return "dry-run"
    record = record_path(records, model, dataset, split)
    if not force and os.path.isfile(record):
        print(f"skip: {record} exists", flush=True)
        return "skipped"
    info = {"model": model, "dataset": dataset, "split": split, "suite": suite, "stages": []}
    info["git"] = git_revision()
    info["started_utc"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    info["machine_start"] = machine_info()
    start = time.time()
    status = "done"
    for argv, out in commands:
        t0 = time.time()
        rc = subprocess.call(argv, cwd=REPO)
        stage = {
            "command": shlex.join(argv),
            "rc": rc,
            "wall_s": time.time() - t0,
            "evaluations": evaluations(os.path.join(REPO, out)),
        }
        diag = diagnostics(os.path.join(REPO, out))
        if diag:
            stage["diagnostics"] = diag
        stage_results = os.path.join(REPO, out, "results.json")
        if rc == 0 and os.path.isfile(stage_results):
            with open(stage_results) as f:
                payload = json.load(f)
            stage["final"] = _metrics(payload)
            groups = _group_metrics(payload)
            if groups:
                stage["groups"] = groups
        info["stages"].append(stage)
        if rc != 0:
            status = "failed"
            break
    info["wall_s"] = time.time() - start
    info["machine_end"] = machine_info()
    last = info["stages"][-1]
    if status == "done" and "final" not in last:
        print(
            f"failed: {os.path.join(REPO, final_out, 'results.json')} was not written", flush=True
        )
        status = "failed"
    info["status"] = status
    # output folders are relative to the repository root, where train_net.py runs
    _write_json(os.path.join(REPO, cell_dir(logs, model, dataset, split), "run_info.json"), info)
    if status == "done":
        info["metrics"] = last["final"]  # the last stage's results.json
        _write_json(record, info)
        if not keep_checkpoints:
            prune_checkpoints(os.path.join(REPO, cell_dir(logs, model, dataset, split)))
    return status


def prune_checkpoints(folder):
    """Delete every ``*.pth`` under ``folder``; returns the paths deleted."""
    gone = []
    for dirpath, _, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(".pth"):
                path = os.path.join(dirpath, name)
                os.remove(path)
                gone.append(path)
    if gone:
        print(f"deleted {len(gone)} checkpoints under {folder} (--keep-checkpoints keeps them)")
    return gone


def _results(results):
    res = results.get("results", results)
    if "Rank-1" not in res and len(res) == 1:
        res = next(iter(res.values()))
    return res


def _metrics(results):
    """Flat ``{metric: value}`` of a ``results.json`` payload (single test set)."""
    res = _results(results)
    return {m: float(res[m]) for m in METRICS}


def _group_metrics(results):
    """``{group: {metric: value}}`` of the prefixed metric groups of a ``results.json`` payload
    (PFE stage II's ``F5/Rank-1``, ``side/mAP``, ...); empty when there are none."""
    groups = {}
    for key, value in _results(results).items():
        group, _, name = key.rpartition("/")
        if group and name in METRICS:
            groups.setdefault(group, {})[name] = float(value)
    return {g: m for g, m in groups.items() if len(m) == len(METRICS)}


def load_records(records, models=MODELS):
    """Every finished cell's record under ``records``.

    Returns:
        list[dict]: the records, each with ``split`` as an int and ``metrics`` as floats, in
        :data:`MODELS`, :data:`DATASETS` and split order.
    Raises:
        ValueError: a record is not valid JSON or lacks its metrics (names the file).
    """
    found = []
    for model in models:
        top = os.path.join(records, model)
        for dataset in ordered_datasets(os.listdir(top) if os.path.isdir(top) else ()):
            folder = os.path.join(records, model, dataset)
            if not os.path.isdir(folder):
                continue
            cells = []
            for entry in os.listdir(folder):
                stem, ext = os.path.splitext(entry)
                if ext != ".json" or not stem.startswith("split_") or not stem[6:].isdigit():
                    continue
                path = os.path.join(folder, entry)
                try:
                    with open(path) as f:
                        rec = json.load(f)
                    rec["metrics"] = {m: float(rec["metrics"][m]) for m in METRICS}
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(
                        f"{path}: not a real-data record (expected JSON with 'metrics' "
                        f"{list(METRICS)}): {e!r}"
                    ) from e
                rec.update(model=model, dataset=dataset, split=int(stem[6:]))
                cells.append(rec)
            found += sorted(cells, key=lambda c: c["split"])
    return found


def _revision(rec):
    git = rec.get("git") or {}
    rev = git.get("rev", "n/a")[:7]
    return rev + ("+dirty" if git.get("dirty") else "")


def collect(records, models=MODELS):
    """The records under ``records`` aggregated per (model, dataset) over the splits.

    Returns:
        list[dict]: one row per (model, dataset) with ``model``, ``display``, ``dataset``,
        ``splits`` (sorted ints), ``n``, ``<metric>_mean`` / ``<metric>_std`` (sample std,
        0 for one split) for :data:`METRICS`, ``wall_s`` (mean over the records that have it,
        else None), ``machine`` (``machine_start`` of the first split) and ``revisions`` (the
        git revisions the runs were made at). Rows follow :data:`MODELS` and :data:`DATASETS`.
    """
    groups = {}
    for rec in load_records(records, models):
        groups.setdefault((rec["model"], rec["dataset"]), []).append(rec)
    rows = []
    for (model, dataset), cells in groups.items():
        walls = [float(c["wall_s"]) for c in cells if c.get("wall_s") is not None]
        row = {
            "model": model,
            "display": models[model][0],
            "dataset": dataset,
            "splits": [c["split"] for c in cells],
            "n": len(cells),
            "wall_s": statistics.mean(walls) if walls else None,
            "machine": cells[0].get("machine_start"),
            "revisions": sorted({_revision(c) for c in cells}),
        }
        for m in METRICS:
            values = [c["metrics"][m] for c in cells]
            row[f"{m}_mean"] = statistics.mean(values)
            row[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def markdown_runs(recs, models=MODELS):
    """Markdown table with one line per run: rank-1 / mAP at every evaluation during training
    and at the end (from the record's stages; a two-stage model lists both stages), wall time,
    start time and load, git revision. (fast-reid's ``metrics.json`` misses the evaluation after
    the last iteration; "final" is the stage's ``results.json``, the record's metrics for the
    last stage.)"""
    lines = [
        "| model | dataset | split | rank-1 / mAP during training (iteration); final | wall | "
        "started (UTC), load | git |",
        "|---|---|---|---|---|---|---|",
    ]
    for rec in recs:
        evals = []
        stages = rec.get("stages") or []
        for i, stage in enumerate(stages):
            tag = f"stage {i + 1}: " if len(stages) > 1 else ""
            points = [
                f"{e['Rank-1']:.1f} / {e['mAP']:.1f} ({e['iteration']})"
                for e in stage.get("evaluations") or []
            ]
            final = stage.get("final") or (rec["metrics"] if i == len(stages) - 1 else None)
            if final:
                points.append(f"final {final['Rank-1']:.1f} / {final['mAP']:.1f}")
            evals.append(tag + ", ".join(points or ["n/a"]))
        wall = rec.get("wall_s")
        cells = [
            models[rec["model"]][0],
            DATASETS.get(rec["dataset"], rec["dataset"]),
            str(rec["split"]),
            "; ".join(evals) or "n/a",
            f"{wall / 60:.1f} min" if wall is not None else "n/a",
            f"{rec.get('started_utc', 'n/a')}, {_load_text(rec.get('machine_start')) or 'n/a'}",
            _revision(rec),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(records):
    """The Markdown block of :func:`main`: per backbone variant that has records (ResNet-18
    always), a heading, the aggregated table, then one line per run."""
    parts = []
    for sub, _, heading in VARIANTS.values():
        folder = os.path.join(records, sub) if sub else records
        recs = load_records(folder)
        if sub and not recs:
            continue
        parts.append(f"**{heading}**\n\n" + markdown(collect(folder)) + "\n" + markdown_runs(recs))
    return "\n".join(parts)


def view_metrics(rec, view):
    """The metrics of one view of a record (see :data:`COMPARISONS`), or None if absent."""
    stages = rec.get("stages") or []
    if view == "final":
        return rec["metrics"]
    if view == "stage1":
        return (stages[0].get("final") if stages else None) or None
    return ((stages[-1].get("groups") or {}).get(view) if stages else None) or None


def _mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def load_costs(path):
    """``{benchmarks/run.py model name: row}`` of a ``benchmarks/run.py --output`` JSON file,
    ``{}`` when the file does not exist."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        payload = json.load(f)
    return {row["model"]: row for row in payload.get("rows", []) if row.get("model")}


def pair_rows(records, costs=None):
    """Each comparison of :data:`COMPARISONS` on each dataset, paired by split.

    Only splits where both the method's and the base's view exist are used.

    Args:
        records (str): the pairs' records folder.
        costs (dict | None): :func:`load_costs` rows for the cost ratios.
    Returns:
        list[dict]: ``paper``, ``added``, ``dataset``, ``splits``; for ``"Rank-1"`` and
        ``"mAP"``: ``<m>_method`` / ``<m>_base`` (mean, std), ``<m>_diffs`` (method - base per
        split, in split order), ``<m>_diff_mean``, ``<m>_wins`` (splits where the method is
        higher); ``step_ratio`` / ``macs_ratio`` (method / base, None without costs).
    """
    costs = costs or {}
    by_cell = {}
    for rec in load_records(records, PAIR_MODELS):
        by_cell.setdefault((rec["model"], rec["dataset"]), {})[rec["split"]] = rec
    rows = []
    for paper, added, (mcell, mview), (bcell, bview) in COMPARISONS:
        for dataset in ordered_datasets(d for _, d in by_cell):
            method = by_cell.get((mcell, dataset), {})
            base = by_cell.get((bcell, dataset), {})
            pairs = []
            for split in sorted(set(method) & set(base)):
                m, b = view_metrics(method[split], mview), view_metrics(base[split], bview)
                if m and b:
                    pairs.append((split, m, b))
            if not pairs:
                continue
            row = {"paper": paper, "added": added, "dataset": dataset}
            row["splits"] = [p[0] for p in pairs]
            for metric in ("Rank-1", "mAP"):
                mv = [p[1][metric] for p in pairs]
                bv = [p[2][metric] for p in pairs]
                diffs = [a - b for a, b in zip(mv, bv)]
                row[f"{metric}_method"] = _mean_std(mv)
                row[f"{metric}_base"] = _mean_std(bv)
                row[f"{metric}_diffs"] = diffs
                row[f"{metric}_diff_mean"] = statistics.mean(diffs)
                row[f"{metric}_wins"] = sum(d > 0 for d in diffs)
            mc, bc = costs.get(COST_MODELS[(mcell, mview)]), costs.get(COST_MODELS[(bcell, bview)])
            for key, name in (("train_step_s", "step_ratio"), ("macs", "macs_ratio")):
                ok = mc and bc and mc.get(key) and bc.get(key)
                row[name] = mc[key] / bc[key] if ok else None
            rows.append(row)
    return rows


def markdown_pairs(rows):
    """Markdown table of :func:`pair_rows` (metrics in %)."""
    lines = [
        "| paper | added | dataset | splits | rank-1 method | rank-1 base | rank-1 difference "
        "per split | mean | method better | mAP method | mAP base | mAP difference per split | "
        "mean | method better | step time x | MACs x |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        n = len(r["splits"])
        cells = [
            r["paper"],
            r["added"],
            DATASETS.get(r["dataset"], r["dataset"]),
            ",".join(map(str, r["splits"])),
        ]
        for metric in ("Rank-1", "mAP"):
            cells += [
                "{:.1f} +- {:.1f}".format(*r[f"{metric}_method"]),
                "{:.1f} +- {:.1f}".format(*r[f"{metric}_base"]),
                ", ".join(f"{d:+.1f}" for d in r[f"{metric}_diffs"]),
                f"{r[f'{metric}_diff_mean']:+.1f}",
                f"{r[f'{metric}_wins']} of {n}",
            ]
        for key in ("step_ratio", "macs_ratio"):
            cells.append(f"{r[key]:.2f}" if r[key] is not None else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_diagnostics(recs, models=PAIR_MODELS):
    """Markdown table of the training diagnostics of the records that have them (the last
    stage's last logged values, :func:`diagnostics`), averaged over each cell's splits: the
    gradient norm of each loss term at the last backbone stage, feature norms, normalised
    attention entropies and dead-row fractions. Empty string when no record has them."""
    per = {}
    for rec in recs:
        stages = rec.get("stages") or []
        last = ((stages[-1].get("diagnostics") or {}).get("last")) if stages else None
        if last:
            per.setdefault((rec["model"], rec["dataset"]), []).append((rec["split"], last))
    if not per:
        return ""
    kinds = (
        ("grad", "gradient norm at the last stage, per loss term"),
        ("feat_norm", "feature norm"),
        ("entropy", "attention entropy / log M"),
        ("dead", "dead rows"),
    )
    lines = [
        "| model | dataset | splits | iteration | " + " | ".join(t for _, t in kinds) + " |",
        "|---|---|---|---|" + "---|" * len(kinds),
    ]
    for (model, dataset), found in per.items():
        keys = sorted({k for _, v in found for k in v if k != "iteration"})
        cells = [
            models[model][0],
            DATASETS.get(dataset, dataset),
            ",".join(str(split) for split, _ in found),
            ",".join(sorted({str(v["iteration"]) for _, v in found})),
        ]
        for kind, _ in kinds:
            prefix = f"diag/{kind}/"
            parts = []
            for k in keys:
                if k.startswith(prefix):
                    vals = [v[k] for _, v in found if k in v]
                    parts.append(f"{k[len(prefix) :]} {statistics.mean(vals):.3g}")
            cells.append(", ".join(parts) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report_pairs(records):
    """The pairs' Markdown block: the paired comparisons (with the cost ratios of
    ``<records>/costs.json`` when present), every cell's mean over its splits (PFE stage II's
    metric groups as extra lines), then one line per run."""
    costs = load_costs(os.path.join(records, "costs.json"))
    recs = load_records(records, PAIR_MODELS)
    cells = collect(records, PAIR_MODELS)
    group_lines = []
    for group in ("F5", "side"):
        per = {}
        for rec in recs:
            metrics = view_metrics(rec, group)
            if metrics:
                per.setdefault((rec["model"], rec["dataset"]), []).append((rec, metrics))
        for (model, dataset), found in per.items():
            row = {
                "model": model,
                "display": f"{PAIR_MODELS[model][0]}: {group} alone",
                "dataset": dataset,
                "splits": [rec["split"] for rec, _ in found],
                "n": len(found),
                "wall_s": None,
                "machine": found[0][0].get("machine_start"),
                "revisions": sorted({_revision(rec) for rec, _ in found}),
            }
            for m in METRICS:
                row[f"{m}_mean"], row[f"{m}_std"] = _mean_std([x[m] for _, x in found])
            group_lines.append(row)
    return (
        "**Pairs: method against its own base (paired by split)**\n\n"
        "Rank-1 and mAP in %. Method and base: mean +- sample standard deviation over the"
        " splits listed. Difference per split: method - base on the same split, in split"
        " order; method better: how many of those differences are > 0. Step time x and"
        " MACs x: method / base from `benchmarks/run.py` at 192x64, batch 32"
        " (`benchmarks/real_data/pairs/costs.json`).\n\n"
        + markdown_pairs(pair_rows(records, costs))
        + "\n**Every cell (mean +- std over its splits)**\n\n"
        + markdown(cells + group_lines)
        + "\n"
        + markdown_runs(recs, PAIR_MODELS)
        + (
            f"\n**Training diagnostics at the last logged iteration (mean over splits)**\n\n{diag}"
            if (diag := markdown_diagnostics(recs))
            else ""
        )  # fmt: skip
    )


#: Each paper README quotes its pairs' lines between these markers (``--update-readmes``).
README_MARKS = ("<!-- pairs:begin -->", "<!-- pairs:end -->")


def readme_path(paper):
    """``projects/<paper>/README.md``."""
    return os.path.join(REPO, "projects", paper, "README.md")


def update_readmes(records, readme=readme_path):
    """Write each paper's rows of the pairs table (:func:`pair_rows`, with the cost ratios)
    between :data:`README_MARKS` in its README (``readme(paper)``); a paper without rows yet
    gets a line saying so.

    Raises:
        ValueError: a README lacks the markers (names the file and the markers expected).
    Returns:
        list[str]: the READMEs written.
    """
    written = []
    for paper, table in readme_tables(records).items():
        path = readme(paper)
        text = open(path).read() if os.path.isfile(path) else ""
        if not all(m in text for m in README_MARKS):
            raise ValueError(
                f"{path}: expected the markers {README_MARKS[0]} and {README_MARKS[1]} around "
                "the pairs' lines"
            )
        update_markdown(path, table, README_MARKS)
        written.append(path)
    return written


def readme_tables(records):
    """Each paper's lines of the pairs table (:func:`pair_rows` with the cost ratios), as
    :func:`update_readmes` writes them between :data:`README_MARKS`.

    Returns:
        dict[str, str]: paper -> markdown (a line saying so for a paper without rows yet).
    """
    rows = pair_rows(records, load_costs(os.path.join(records, "costs.json")))
    tables = {}
    for paper in dict.fromkeys(c[0] for c in COMPARISONS):
        mine = [r for r in rows if r["paper"] == paper]
        tables[paper] = markdown_pairs(mine) if mine else "(no finished pair yet)\n"
    return tables


def _load_text(machine):
    """``machine_info()``'s 1 / 5 / 15-minute load average as ``"a/b/c"`` ("" if absent)."""
    return "/".join(f"{x:.1f}" for x in (machine or {}).get("loadavg") or [])


def _machine_text(machine):
    if not machine:
        return "n/a"
    load = _load_text(machine)
    return f"{machine['nproc']} x {machine['cpu']}, torch {machine['torch']}, load {load}"


def markdown(rows):
    """Markdown table of :func:`collect` rows (metrics in %, mean +- std over splits)."""
    head = (
        "| model | dataset | splits | Rank-1 | Rank-5 | Rank-10 | mAP | wall time / run | "
        "machine (at start) | git |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [
            r["display"],
            DATASETS.get(r["dataset"], r["dataset"]),
            f"{r['n']} ({','.join(map(str, r['splits']))})",
        ]
        cells += [f"{r[m + '_mean']:.1f} +- {r[m + '_std']:.1f}" for m in METRICS]
        cells.append(f"{r['wall_s'] / 60:.1f} min" if r["wall_s"] is not None else "n/a")
        cells.append(_machine_text(r["machine"]))
        cells.append(", ".join(r.get("revisions") or ["n/a"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def update_markdown(path, table, marks=(BEGIN_MARK, END_MARK)):
    """Replace the text between the ``marks`` (default :data:`BEGIN_MARK` and
    :data:`END_MARK`) in ``path`` by ``table`` (appended with the markers when they are
    missing)."""
    begin, end = marks
    text = open(path).read() if os.path.isfile(path) else ""
    block = f"{begin}\n{table}{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
        text = head + block + tail
    else:
        text = text + ("\n" if text and not text.endswith("\n") else "") + block + "\n"
    _write_text(path, text)


def parse_args(argv=None) -> Tuple[argparse.Namespace, list]:
    """Command line; everything after ``--`` is extra ``KEY VALUE`` overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="train cells")
    run.add_argument(
        "--models",
        nargs="+",
        default=None,
        choices=sorted(set(MODELS) | set(PAIR_MODELS)),
        help="cells of the suite (default: all of them)",
    )
    run.add_argument(
        "--datasets",
        nargs="+",
        default=list(DATASETS),
        help=f"short names {list(DATASETS)} or any registered dataset name",
    )
    run.add_argument("--splits", nargs="+", type=int, default=[0])
    run.add_argument("--root", default=os.path.join("..", "shared", "data"))
    run.add_argument("--dry-run", action="store_true", help="print the commands only")
    run.add_argument("--force", action="store_true", help="re-run cells that have results")
    run.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep a finished cell's *.pth files (default: deleted once its record is written)",
    )
    run.add_argument("--logs", default=os.path.join("logs", "realdata"), help="training outputs")
    run.add_argument(
        "--variant",
        default="r18",
        choices=list(VARIANTS),
        help="backbone: r18 (the shared budget) or r50 (records and logs in an 'r50' subfolder)",
    )
    col = sub.add_parser("collect", help="Markdown table of finished cells")
    for p in (run, col):
        p.add_argument(
            "--suite",
            default="league",
            choices=list(SUITES),
            help="league: every model under one budget (configs/RealData); pairs: each method "
            "against its own base (configs/Pairs; records and logs in a 'pairs' subfolder)",
        )
        p.add_argument(
            "--records",
            default=RECORDS,
            help="folder of the finished cells' records (tracked by git)",
        )
        p.add_argument("--update-md", default=None, help="rewrite the table block of this file")
        p.add_argument(
            "--update-readmes",
            action="store_true",
            help="pairs: also rewrite each paper README's lines (projects/<paper>/README.md)",
        )
    return parser.parse_args(argv), extra


def _report(records, suite):
    if suite == "pairs":
        return report_pairs(os.path.join(records, SUITES[suite][2]))
    return report(records)


def main(argv=None):
    args, extra = parse_args(argv)
    _, models, suite_sub, suite_logs, marks = SUITES[args.suite]
    if args.cmd == "run":
        chosen = args.models or list(models)
        unknown = [m for m in chosen if m not in models]
        if unknown:
            raise SystemExit(
                f"--models {' '.join(unknown)}: not cells of --suite {args.suite}; "
                f"expected some of {list(models)}"
            )
        if args.suite != "league" and args.variant != "r18":
            raise SystemExit(f"--variant {args.variant}: only the league has backbone variants")
        sub, overrides, _ = VARIANTS[args.variant]
        sub = sub or suite_sub
        extra = list(overrides) + list(extra)
        records = os.path.join(args.records, sub) if sub else args.records
        logs = os.path.join(args.logs, sub or suite_logs) if (sub or suite_logs) else args.logs
        for split in args.splits:
            for dataset in args.datasets:
                for model in chosen:
                    status = run_cell(
                        model,
                        dataset,
                        split,
                        args.root,
                        logs,
                        extra,
                        args.dry_run,
                        args.force,
                        records,
                        args.suite,
                        args.keep_checkpoints,
                    )
                    print(f"cell {model}/{dataset}/split_{split}: {status}", flush=True)
                    if status == "done":
                        _update(args, marks)
        return 0
    if args.update_md or args.update_readmes:
        _update(args, marks)
    else:
        sys.stdout.write(_report(args.records, args.suite))
    return 0


def _update(args, marks):
    """``--update-md`` / ``--update-readmes`` of :func:`main`."""
    if args.update_md:
        update_markdown(args.update_md, _report(args.records, args.suite), marks)
    if args.update_readmes:
        if args.suite != "pairs":
            raise SystemExit("--update-readmes: only --suite pairs has per-paper lines")
        update_readmes(os.path.join(args.records, SUITES[args.suite][2]))


if __name__ == "__main__":
    sys.exit(main())
