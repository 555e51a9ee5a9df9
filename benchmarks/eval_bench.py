"""Evaluation at scale: fast-reid's stock evaluator vs reidzoo's chunked one, and retrieval.

Usage::

    nice -n 10 .venv/bin/python benchmarks/eval_bench.py [--cases market-stock market-ours ...]
        [--retrieval-size 1000000] [--retrieval-queries 10000] [--cython-dir DIR]
        [--output results.json] [--markdown]

Every case runs in its own subprocess; its wall time is measured inside it and its peak
resident memory is the subprocess's ``ru_maxrss`` from ``os.wait4`` (what ``/usr/bin/time``
reports), so one case's memory never leaks into another's. Features are random (seeded) and
generated inside the subprocess, so the peak includes them and the Python/torch runtime; the
``rss_before_mib`` field is the resident memory just before evaluation starts.

Cases:

* ``market-stock`` / ``market-ours``: 3,368 queries x 15,913 gallery, 2048-d, cosine (Market-1501
  size). Stock is fast-reid's ``ReidEvaluator`` (``build_dist`` + ``evaluate_rank``, the numpy
  fallback here since the Cython extension is not built); ours is ``ChunkedReidEvaluator`` with
  the default config. Both are fed the same features in batches of 256 through ``process`` and
  timed over ``evaluate``; their metrics are compared.
* ``market-stock-cython``: the stock evaluator with fast-reid's Cython ranking, when
  ``--cython-dir`` holds a ``rank_cy`` module built from fast-reid's ``rank_cy.pyx``.
* ``msmt-ours``, ``msmt-stock-cython`` (with ``--cython-dir``) and ``msmt-stock`` (numpy
  fallback, only when asked for: ~30 min): 11,659 x 82,161, MSMT17 size. A stock case is only
  started when ``MemAvailable`` exceeds its estimated peak (:func:`stock_estimate`) by 3 GiB;
  otherwise its row says it was not run and why.
* ``retrieval``: a synthetic re-ID-like gallery (``--retrieval-size`` 256-d L2-normalised
  features around 50,000 identity centres) written to shards, then faiss indexes built from the
  shards (exact Flat, IVF-Flat, IVF-PQ, HNSW on a subset) and searched with
  ``--retrieval-queries`` queries: build time, queries/s and recall@10 against the exact index.

Nothing here asserts a number; the results go to ``BENCHMARKS.md``.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

SIZES = {"market": (3368, 15913), "msmt": (11659, 82161)}
DIM = 2048
NUM_IDS = {"market": 751, "msmt": 3060}
CASES = (
    "market-stock",
    "market-ours",
    "market-stock-cython",
    "msmt-ours",
    "msmt-stock-cython",
    "msmt-stock",
    "retrieval",
)
DEFAULT_CASES = CASES[:5] + ("retrieval",)


def _rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------------
# child side
# ------------------------------------------------------------------------------------------
def _make_eval_data(size, seed=0):
    """Random features [Q+G, 2048] and identities/cameras like the dataset's test split."""
    import numpy as np
    import torch

    nq, ng = SIZES[size]
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(nq + ng, DIM, generator=gen)
    rng = np.random.default_rng(seed)
    pids = rng.integers(0, NUM_IDS[size], nq + ng)
    camids = rng.integers(0, 6 if size == "market" else 15, nq + ng)
    return nq, feats, pids, camids


def _run_evaluator(case, cython_dir=None, repeat=1):
    import numpy as np
    import torch

    import reidzoo  # noqa: F401  (compat fixes)
    from reidzoo.config import get_cfg

    size, kind = case.split("-", 1)
    nq, feats, pids, camids = _make_eval_data(size)
    cfg = get_cfg()
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "TEST.METRIC", "cosine"])
    timings = {}
    if kind.startswith("stock"):
        from fastreid.evaluation import ReidEvaluator, rank, reid_evaluation

        if kind == "stock-cython":
            sys.path.insert(0, cython_dir)
            from rank_cy import evaluate_cy

            rank.evaluate_cy = evaluate_cy
            rank.IS_CYTHON_AVAI = True
        orig_dist = reid_evaluation.build_dist

        def timed_dist(*args, **kwargs):
            t = time.perf_counter()
            out = orig_dist(*args, **kwargs)
            timings["distance_s"] = time.perf_counter() - t
            return out

        reid_evaluation.build_dist = timed_dist
        evaluator = ReidEvaluator(cfg, nq)
    else:
        from reidzoo.evaluation import ChunkedReidEvaluator

        cfg.TEST.EVALUATOR = "ChunkedReidEvaluator"
        evaluator = ChunkedReidEvaluator(cfg, nq)
    evaluator.reset()
    for a in range(0, len(feats), 256):
        inputs = {
            "targets": torch.from_numpy(pids[a : a + 256]),
            "camids": torch.from_numpy(camids[a : a + 256]),
        }
        evaluator.process(inputs, feats[a : a + 256].clone())  # a model's output batch
    del feats
    rss_before = _rss_mib()
    runs, dist_runs = [], []
    while True:
        timings.clear()
        t = time.perf_counter()
        results = evaluator.evaluate()
        runs.append(time.perf_counter() - t)
        dist_runs.append(timings.get("distance_s", float("nan")))
        if len(runs) >= repeat or runs[0] > 30:
            break
    mid = sorted(range(len(runs)), key=runs.__getitem__)[len(runs) // 2]  # median run
    out = {
        "case": case,
        "queries": nq,
        "gallery": len(pids) - nq,
        "eval_s": runs[mid],
        "eval_runs_s": runs,
        "rss_before_mib": rss_before,
        "results": {k: float(v) for k, v in results.items()},
        "threads": torch.get_num_threads(),
    }
    if "distance_s" in timings:
        out["distance_s"] = dist_runs[mid]
        out["ranking_s"] = runs[mid] - dist_runs[mid]
    if getattr(evaluator, "last_result", None) is not None:
        out["skipped_queries"] = evaluator.last_result.num_skipped
        out["sorted_rows"] = evaluator.last_result.num_sorted_rows
    out["numpy"] = np.__version__
    return out


def _clustered_chunk(centres, n, rng, noise=0.6):
    import numpy as np

    ids = rng.integers(0, len(centres), n)
    x = centres[ids] + noise * rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def _run_retrieval(size, num_queries, hnsw_size, workdir):
    import faiss
    import numpy as np

    from reidzoo.evaluation import FeatureShardReader, FeatureShardWriter, GalleryIndex, recall_at_k

    dim, k = 256, 10
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50_000, dim), dtype=np.float32)
    out = {
        "case": "retrieval",
        "gallery": size,
        "queries": num_queries,
        "dim": dim,
        "faiss_threads": faiss.omp_get_max_threads(),
    }
    shard_dir = os.path.join(workdir, "shards")
    t = time.perf_counter()
    with FeatureShardWriter(shard_dir, shard_size=100_000) as w:
        for a in range(0, size, 50_000):
            n = min(50_000, size - a)
            w.append(_clustered_chunk(centres, n, rng), [f"g{i}" for i in range(a, a + n)])
    out["shard_write_s"] = time.perf_counter() - t
    out["shards"] = FeatureShardReader(shard_dir).num_shards
    queries = _clustered_chunk(centres, num_queries, rng)

    def measure(name, spec, settings=({},), source=shard_dir, train_size=65_536, exact=None):
        t = time.perf_counter()
        index = GalleryIndex.build(source, spec, "cosine", train_size=train_size)
        build = time.perf_counter() - t
        path = os.path.join(workdir, name + ".index")
        t = time.perf_counter()
        index.save(path)
        index = GalleryIndex.load(path)
        save_load = time.perf_counter() - t
        os.remove(path)
        found = []
        for params in settings:
            t = time.perf_counter()
            _, ids = index.search(queries, k, **params)
            search = time.perf_counter() - t
            row = {
                "spec": spec,
                "params": params,
                "ntotal": index.ntotal,
                "build_s": build,
                "save_load_s": save_load,
                "search_s": search,
                "qps": num_queries / search,
                "rss_mib": _rss_mib(),
            }
            if exact is not None:
                row["recall@10"] = recall_at_k(ids, exact, k)
            found.append((row, ids))
        return found

    rows = {}
    ((rows["flat"], exact),) = measure("flat", "Flat")
    for name, spec, settings in (
        ("ivf_flat", "IVF1024,Flat", ({"nprobe": 16}, {"nprobe": 64})),
        ("ivf_pq", "IVF1024,PQ64x4fs", ({"nprobe": 16},)),
        ("ivf_pq_refine", "IVF1024,PQ64x4fs,RFlat", ({"nprobe": 16, "k_factor": 4},)),
    ):
        for j, (row, _) in enumerate(measure(name, spec, settings, exact=exact)):
            rows[f"{name}_{j}"] = row
    # HNSW on a prefix of the gallery (its insertion is the slow part on 2 cores)
    sub = min(hnsw_size, size)
    reader = FeatureShardReader(shard_dir)
    prefix = np.concatenate([b for s, b in reader.iter_batches(100_000) if s < sub])[:sub]
    ((flat_sub, exact_sub),) = measure("flat_sub", "Flat", source=prefix)
    flat_sub["spec"] = f"Flat (first {sub} rows)"
    rows["flat_subset"] = flat_sub
    hnsw = measure(
        "hnsw", "HNSW32", ({"ef_search": 64}, {"ef_search": 256}), source=prefix, exact=exact_sub
    )
    for j, (row, _) in enumerate(hnsw):
        rows[f"hnsw_{j}"] = row
    out["indexes"] = rows
    return out


def child(args):
    if args.child == "retrieval":
        with tempfile.TemporaryDirectory(prefix="eval_bench_") as d:
            out = _run_retrieval(args.retrieval_size, args.retrieval_queries, args.hnsw_size, d)
    else:
        out = _run_evaluator(args.child, args.cython_dir, args.repeat)
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------
# parent side
# ------------------------------------------------------------------------------------------
def _mem_available_gib():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def run_case(case, args):
    """Run one case in a subprocess; returns its JSON plus wall time and peak RSS."""
    if case.startswith("msmt-stock"):
        need, have = stock_estimate("msmt")["peak_gib"], _mem_available_gib()
        if have < need + 3:
            row = {"case": case, "error": f"not run: needs ~{need:.1f} GiB, {have:.1f} available"}
            print(json.dumps(row), file=sys.stderr, flush=True)
            return row
    cmd = [sys.executable, os.path.abspath(__file__), "--child", case]
    cmd += ["--retrieval-size", str(args.retrieval_size)]
    cmd += ["--retrieval-queries", str(args.retrieval_queries)]
    cmd += ["--hnsw-size", str(args.hnsw_size), "--repeat", str(args.repeat)]
    if args.cython_dir:
        cmd += ["--cython-dir", args.cython_dir]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    row = {"case": case, "process_s": time.perf_counter() - t}
    row["peak_rss_mib"] = usage.ru_maxrss / 1024  # kilobytes on Linux
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        row["error"] = f"exit {proc.returncode}: {stderr.strip().splitlines()[-3:]}"
    else:
        row.update(json.loads(lines[-1][len("RESULT ") :]))
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def stock_estimate(size):
    """fast-reid's stock memory at ``size``: features (+ cat copy, + normalised copies), the
    distance matrix with its ``mm`` temporary, and ``np.argsort``'s int64 indices."""
    nq, ng = SIZES[size]
    feats = (nq + ng) * DIM * 4
    return {
        "features_gib": feats / 2**30,
        "distances_gib": nq * ng * 4 / 2**30,
        "argsort_gib": nq * ng * 8 / 2**30,
        "peak_gib": (3 * feats + nq * ng * (4 + 8)) / 2**30,
    }


def machine():
    import torch

    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) / 2**20
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_avg": os.getloadavg(),
    }


def _max_diff(row, rows):
    """Largest |difference| of any result key against the first stock row of the same size."""
    size = row["case"].split("-")[0]
    for ref in rows:
        if ref["case"].startswith(size + "-stock") and "results" in ref and ref is not row:
            keys = set(ref["results"]) & set(row["results"])
            diff = max(abs(ref["results"][k] - row["results"][k]) for k in keys)
            return f"{diff:.1e} ({ref['case']})"
    return "-"


def markdown(report):
    lines = [f"`{report['command']}`", "", f"{report['date']}, {report['machine']}", ""]
    lines += [
        "| case | Q x G | eval wall s (runs) | distance s | ranking s | peak RSS MiB | "
        "mAP % | Rank-1 % | max abs diff of all keys vs |"
    ]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    rows = [r for r in report["rows"] if "results" in r]
    for r in rows:
        res = r["results"]
        runs = ", ".join(f"{x:.1f}" for x in r["eval_runs_s"])
        lines.append(
            f"| {r['case']} | {r['queries']} x {r['gallery']} | {r['eval_s']:.1f} ({runs}) | "
            f"{r.get('distance_s', float('nan')):.1f} | {r.get('ranking_s', float('nan')):.1f} | "
            f"{r['peak_rss_mib']:.0f} | {res['mAP']:.9g} | {res['Rank-1']:.9g} | "
            f"{'-' if 'stock' in r['case'] else _max_diff(r, rows)} |"
        )
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"\n{r['case']}: {r['error']}")
        if r["case"] != "retrieval" or "error" in r:
            continue
        lines += ["", f"retrieval: {r['gallery']} x {r['dim']}-d gallery, {r['queries']} queries"]
        lines += [f"(shards written in {r['shard_write_s']:.1f} s, {r['shards']} shards)", ""]
        lines += ["| index | rows | build s | save+load s | search s | queries/s | recall@10 |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for name, x in r["indexes"].items():
            rec = x.get("recall@10")
            lines.append(
                f"| {name} `{x['spec']}` {x['params'] or ''} | {x['ntotal']} | {x['build_s']:.1f} "
                f"| {x['save_load_s']:.1f} | {x['search_s']:.1f} | {x['qps']:.0f} | "
                f"{'exact' if rec is None else f'{rec:.3f}'} |"
            )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES))
    p.add_argument("--retrieval-size", type=int, default=1_000_000)
    p.add_argument("--retrieval-queries", type=int, default=10_000)
    p.add_argument("--hnsw-size", type=int, default=200_000)
    p.add_argument("--repeat", type=int, default=3, help="evaluations per case when one < 30 s")
    p.add_argument("--cython-dir", default="", help="folder with a built rank_cy module")
    p.add_argument("--output", default="")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    unknown = set(args.cases) - set(CASES)
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; choose from {CASES}")
    cases = [c for c in args.cases if not c.endswith("-cython") or args.cython_dir]
    report = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine(),
        "stock_estimate": {s: stock_estimate(s) for s in SIZES},
        "rows": [run_case(c, args) for c in cases],
    }
    report["load_avg_after"] = os.getloadavg()
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
    print(markdown(report) if args.markdown else json.dumps(report, indent=1))
    return 1 if any("error" in r for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
