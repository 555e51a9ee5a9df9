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
        dataset (str): a key of :data:`DATASETS`, or any name in fast-reid's
            ``DATASET_REGISTRY`` once reidzoo and the installed plugins are loaded.
    Returns:
        str
    Raises:
        KeyError: neither (the message lists the short names and the registered datasets).
    """
    if dataset in DATASETS:
        return DATASETS[dataset]
    from reidzoo.plugins import load_plugins  # imports torch: only for a registry name
    from reidzoo.registry import DATASET_REGISTRY

    load_plugins()
    if dataset in DATASET_REGISTRY._obj_map:
        return dataset
    raise KeyError(
        f"unknown dataset '{dataset}'; short names: {sorted(DATASETS)}; registered datasets: "
        f"{sorted(DATASET_REGISTRY._obj_map)}"
    )


def ordered_datasets(names):
    """``names`` with the :data:`DATASETS` keys first, in that order, then the others sorted."""
    names = set(names)
    return [d for d in DATASETS if d in names] + sorted(names - set(DATASETS))


def stage_name(i, n):
    """Folder name of stage ``i`` (0-based) of ``n``: ``""`` for a single-stage model."""
    return "" if n == 1 else f"stage{i + 1}"


def cell_dir(logs, model, dataset, split):
    """Output folder of one (model, dataset, split) cell."""
    return os.path.join(logs, model, dataset, f"split_{split}")


def build_commands(model, dataset, split, root, logs, python=sys.executable, extra=()):
    """The ``train_net.py`` commands of one cell, one per stage.

    Args:
        model (str): key of :data:`MODELS`.
        dataset (str): key of :data:`DATASETS`.
        split (int): split index (0-9).
        root (str): dataset root (``DATASETS.ROOT``).
        logs (str): root of the output folders.
        python (str): interpreter.
        extra (Sequence[str]): further ``KEY VALUE`` overrides, applied last.
    Returns:
        list[tuple[list[str], str]]: ``(argv, output_dir)`` per stage, in order.
    """
    if model not in MODELS:
        raise KeyError(f"unknown model '{model}'; known: {sorted(MODELS)}")
    name = registry_name(dataset)
    stages = MODELS[model][1]
    base = cell_dir(logs, model, dataset, split)
    out_dirs = {}
    commands = []
    for i, stage in enumerate(stages):
        sname = stage_name(i, len(stages))
        out = os.path.join(base, sname) if sname else base
        out_dirs[sname] = out
        argv = [python, "train_net.py", "--config-file", os.path.join(CONFIG_DIR, stage.config)]
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


def evaluations(output_dir):
    """Every evaluation a run logged: ``[{"iteration": i, metric: value, ...}]``.

    Read from fast-reid's ``metrics.json`` (one JSON object per line, written by its
    ``JSONWriter``; evaluation scalars are named ``<metric>`` or ``<dataset>/<metric>``).
    Missing file or unparsable lines: what could be read.
    """
    path = os.path.join(output_dir, "metrics.json")
    found = []
    if not os.path.isfile(path):
        return found
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            values = {}
            for key, value in entry.items():
                name = key.rsplit("/", 1)[-1]
                if name in METRICS:
                    values[name] = float(value)
            if len(values) == len(METRICS):
                found.append({"iteration": int(entry.get("iteration", -1)), **values})
    return found


def _write_text(path, text):
    """Write ``text`` to ``path`` atomically (:func:`reidzoo.checkpoint.atomic_write`)."""
    from reidzoo.checkpoint import atomic_write  # imports torch: only when writing

    atomic_write(path, lambda f: f.write(text), mode="w")


def _write_json(path, payload):
    """Write ``payload`` as indented JSON to ``path`` atomically."""
    _write_text(path, json.dumps(payload, indent=2) + "\n")


def run_cell(
    model, dataset, split, root, logs, extra=(), dry_run=False, force=False, records=RECORDS
):
    """Train one cell (all its stages), write ``run_info.json`` into its folder and, when every
    stage succeeded, the cell's record (:func:`record_path`).

    Returns:
        str: ``"done"``, ``"skipped"`` (a record exists), ``"dry-run"`` or ``"failed"``.
    """
    commands = build_commands(model, dataset, split, root, logs, extra=extra)
    final_out = commands[-1][1]
    for argv, _ in commands:
        print("$ " + shlex.join(argv), flush=True)
    if dry_run:
        return "dry-run"
    record = record_path(records, model, dataset, split)
    if not force and os.path.isfile(record):
        print(f"skip: {record} exists", flush=True)
        return "skipped"
    info = {"model": model, "dataset": dataset, "split": split, "stages": []}
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
        stage_results = os.path.join(REPO, out, "results.json")
        if rc == 0 and os.path.isfile(stage_results):
            with open(stage_results) as f:
                stage["final"] = _metrics(json.load(f))
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
    return status


def _metrics(results):
    """Flat ``{metric: value}`` of a ``results.json`` payload (single test set)."""
    res = results.get("results", results)
    if "Rank-1" not in res and len(res) == 1:
        res = next(iter(res.values()))
    return {m: float(res[m]) for m in METRICS}


def load_records(records):
    """Every finished cell's record under ``records``.

    Returns:
        list[dict]: the records, each with ``split`` as an int and ``metrics`` as floats, in
        :data:`MODELS`, :data:`DATASETS` and split order.
    Raises:
        ValueError: a record is not valid JSON or lacks its metrics (names the file).
    """
    found = []
    for model in MODELS:
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


def collect(records):
    """The records under ``records`` aggregated per (model, dataset) over the splits.

    Returns:
        list[dict]: one row per (model, dataset) with ``model``, ``display``, ``dataset``,
        ``splits`` (sorted ints), ``n``, ``<metric>_mean`` / ``<metric>_std`` (sample std,
        0 for one split) for :data:`METRICS`, ``wall_s`` (mean over the records that have it,
        else None), ``machine`` (``machine_start`` of the first split) and ``revisions`` (the
        git revisions the runs were made at). Rows follow :data:`MODELS` and :data:`DATASETS`.
    """
    groups = {}
    for rec in load_records(records):
        groups.setdefault((rec["model"], rec["dataset"]), []).append(rec)
    rows = []
    for (model, dataset), cells in groups.items():
        walls = [float(c["wall_s"]) for c in cells if c.get("wall_s") is not None]
        row = {
            "model": model,
            "display": MODELS[model][0],
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


def markdown_runs(recs):
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
            MODELS[rec["model"]][0],
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


def update_markdown(path, table):
    """Replace the text between :data:`BEGIN_MARK` and :data:`END_MARK` in ``path`` by
    ``table`` (appended with the markers when they are missing)."""
    text = open(path).read() if os.path.isfile(path) else ""
    block = f"{BEGIN_MARK}\n{table}{END_MARK}"
    if BEGIN_MARK in text and END_MARK in text:
        head, rest = text.split(BEGIN_MARK, 1)
        tail = rest.split(END_MARK, 1)[1]
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
    run.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
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
            "--records",
            default=RECORDS,
            help="folder of the finished cells' records (tracked by git)",
        )
        p.add_argument("--update-md", default=None, help="rewrite the table block of this file")
    return parser.parse_args(argv), extra


def main(argv=None):
    args, extra = parse_args(argv)
    if args.cmd == "run":
        sub, overrides, _ = VARIANTS[args.variant]
        extra = list(overrides) + list(extra)
        records = os.path.join(args.records, sub) if sub else args.records
        logs = os.path.join(args.logs, sub) if sub else args.logs
        for split in args.splits:
            for dataset in args.datasets:
                for model in args.models:
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
                    )
                    print(f"cell {model}/{dataset}/split_{split}: {status}", flush=True)
                    if args.update_md and status == "done":
                        update_markdown(args.update_md, report(args.records))
        return 0
    table = report(args.records)
    if args.update_md:
        update_markdown(args.update_md, table)
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
