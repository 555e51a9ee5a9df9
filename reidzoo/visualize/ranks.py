"""Retrieval visualisation: one rank-list PNG per query and the CMC curve of a test set.

Usage::

    python -m reidzoo.visualize ranks --config-file CFG_OR_NAME --output DIR \\
        [--checkpoint PTH | --features feats.npz] [--num-queries 8] [--topk 10] \\
        [--dataset NAME ...] [--cell-size 128 64] [--device cpu] [KEY VALUE ...]

For each test set (``DATASETS.TESTS``, or ``--dataset``) the query and gallery images are
those the evaluation uses (reidzoo's dataset builder under ``DATASETS.ROOT``); their features
come from :class:`reidzoo.inference.FeatureExtractor` without normalisation, i.e. the values
the evaluator receives (or from ``--features``, an ``.npz`` of ``python -m reidzoo.extract``
whose ``names`` cover the images). Distances are the evaluator's: fast-reid's ``build_dist``
with ``TEST.METRIC``, after ``TEST.AQE`` and with ``TEST.RERANK`` when enabled. Each query's
gallery is ranked as in the re-ID protocol: images of the query's identity taken by the
query's camera are left out. Written under ``DIR/<dataset>/``:

* ``query_<index>_<name>.png``: the query (blue frame) then its top-k gallery images, framed
  green (same identity) or red (other identity), each captioned with its rank and distance;
  the title gives the query's file and identity;
* ``cmc.png``: the CMC curve over all queries (the numbers ``ranks.json`` holds), with Rank-1
  and mAP in the title;
* ``ranks.json``: the CMC, mAP, mINP and, per drawn query, its top-k names, identities,
  cameras, distances and correctness.

The full ``[Q, G]`` float32 distance matrix is held in memory, as fast-reid's evaluator does.
"""

import json
import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from reidzoo.visualize import common

logger = logging.getLogger(__name__)

#: Size of the CMC figure in inches and its resolution: the PNG is 640 x 440 pixels.
CMC_FIGSIZE = (6.4, 4.4)
CMC_DPI = 100


@dataclass(frozen=True)
class RankLayout:
    """Geometry of a rank-list figure, in pixels.

    A figure is one row: the query cell, a ``query_gap``, then ``k`` gallery cells ``pad``
    apart, with a ``pad`` margin and a ``title_height`` strip on top. A cell is an image box
    ``cell_size`` (h, w) framed by ``border`` and captioned in ``caption_height``.

    Attributes:
        cell_size (tuple[int, int]): image box (h, w).
        border (int): frame width.
        caption_height (int): caption strip under each frame.
        pad (int): margin and spacing between gallery cells.
        query_gap (int): spacing between the query and the first gallery cell.
        title_height (int): title strip on top.
    """

    cell_size: tuple = (128, 64)
    border: int = 4
    caption_height: int = 16
    pad: int = 4
    query_gap: int = 16
    title_height: int = 18

    def figure_size(self, k):
        """(width, height) of a figure with ``k`` gallery cells.

        Args:
            k (int): gallery images shown.
        Returns:
            tuple[int, int]
        """
        cw = self.cell_size[1] + 2 * self.border
        ch = self.cell_size[0] + 2 * self.border + self.caption_height
        width = (
            2 * self.pad + (k + 1) * cw + (self.query_gap if k else 0) + max(k - 1, 0) * self.pad
        )
        return width, self.title_height + 2 * self.pad + ch


def compute_distances(cfg, query_features, gallery_features):
    """The query-gallery distances the evaluator ranks.

    ``TEST.AQE`` (block-wise query expansion, same results as fast-reid's), then fast-reid's
    ``build_dist`` with ``TEST.METRIC``, then ``TEST.RERANK`` (k-reciprocal re-ranking, refused
    above ``TEST.RERANK.MEMORY_BUDGET_GB``).

    Args:
        cfg (CfgNode)
        query_features (Tensor): [Q, D] float32.
        gallery_features (Tensor): [G, D] float32.
    Returns:
        np.ndarray: [Q, G] float32.
    """
    from fastreid.utils.compute_dist import build_dist

    from reidzoo.evaluation import aqe_chunked, check_rerank_memory, rerank_distance

    qf, gf = query_features.float().cpu(), gallery_features.float().cpu()
    if cfg.TEST.AQE.ENABLED:
        a = cfg.TEST.AQE
        qf, gf = aqe_chunked(qf, gf, a.QE_TIME, a.QE_K, a.ALPHA)
    dist = build_dist(qf, gf, cfg.TEST.METRIC)
    if cfg.TEST.RERANK.ENABLED:
        r = cfg.TEST.RERANK
        check_rerank_memory(len(qf), len(gf), r.get("MEMORY_BUDGET_GB", 0))
        dist = rerank_distance(qf, gf, dist, cfg.TEST.METRIC, r.K1, r.K2, r.LAMBDA)
    return np.asarray(dist, dtype=np.float32)


def rank_gallery(dist_row, q_pid, q_camid, g_pids, g_camids, topk):
    """The top-k gallery images of one query under the re-ID protocol.

    The row is sorted with ``np.argsort`` (fast-reid's ranking call); gallery images of the
    query's identity from the query's camera are removed, as in fast-reid's
    ``eval_market1501``.

    Args:
        dist_row (np.ndarray): [G] distances of the query to the gallery.
        q_pid (int): query identity.
        q_camid (int): query camera.
        g_pids (np.ndarray): [G] gallery identities.
        g_camids (np.ndarray): [G] gallery cameras.
        topk (int): how many to return (fewer when fewer remain).
    Returns:
        tuple[np.ndarray, np.ndarray]: gallery indices [k] in rank order, and whether each is
        a correct match (same identity) [k] bool.
    """
    order = np.argsort(dist_row)
    removed = (g_pids[order] == q_pid) & (g_camids[order] == q_camid)
    order = order[~removed][: max(int(topk), 0)]
    return order, g_pids[order] == q_pid


def draw_ranks(query, gallery, distances, correct, layout=None, title=""):
    """A rank-list figure: the query, then gallery images framed by correctness.

    Args:
        query: path or image of the query (see :func:`common.load_image`).
        gallery (Sequence): k paths or images, in rank order.
        distances (Sequence[float]): k distances, shown as ``"<rank>: <distance>"`` (3
            significant digits).
        correct (Sequence[bool]): k flags: green frame when True, red when False.
        layout (RankLayout | None): geometry; None: the defaults.
        title (str): text of the title strip.
    Returns:
        PIL.Image.Image: of size ``layout.figure_size(k)``.
    """
    layout = layout or RankLayout()
    kw = dict(border=layout.border, caption_height=layout.caption_height)
    font = common.get_font(max(8, layout.caption_height - 5))
    cells = [common.make_cell(query, layout.cell_size, common.QUERY, caption="query", **kw)]
    for i, (item, d, ok) in enumerate(zip(gallery, distances, correct)):
        color = common.CORRECT if ok else common.WRONG
        caption = f"{i + 1}: {float(d):.3g}"
        cells.append(
            common.make_cell(item, layout.cell_size, color, caption=caption, font=font, **kw)
        )
    gaps = ([layout.query_gap] + [layout.pad] * (len(cells) - 2)) if len(cells) > 1 else []
    grid = common.compose_grid(cells, len(cells), pad=layout.pad, col_gaps=gaps)
    return common.add_title(grid, title, layout.title_height)


def plot_cmc(cmc, path, title="", label=None):
    """Draw a CMC curve and write it as a PNG (atomically).

    Uses matplotlib's object API with the Agg canvas, so no global backend is changed.

    Args:
        cmc (Sequence[float]): [R] matching rate at ranks 1..R, fractions in [0, 1].
        path (str): PNG file to write.
        title (str): figure title.
        label (str | None): legend entry.
    Returns:
        str: ``path``. The image is ``CMC_FIGSIZE * CMC_DPI`` pixels.
    """
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from reidzoo.checkpoint import atomic_write

    cmc = np.asarray(cmc, dtype=np.float64) * 100
    ranks = np.arange(1, len(cmc) + 1)
    fig = Figure(figsize=CMC_FIGSIZE, dpi=CMC_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(ranks, cmc, marker="o", markersize=3, linewidth=1.5, label=label)
    for r in (1, 5, 10):
        if r <= len(cmc):
            ax.annotate(f"R{r} {cmc[r - 1]:.1f}", (r, cmc[r - 1]), textcoords="offset points",
                        xytext=(4, -12), fontsize=8)  # fmt: skip
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_xlim(0.5, max(len(cmc), 1) + 0.5)
    ax.set_ylim(0, 101)
    ax.grid(True, alpha=0.3)
    if label:
        ax.legend(loc="lower right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=CMC_DPI)
    atomic_write(path, lambda f: f.write(buf.getvalue()))
    return path


def select_queries(num_query, num):
    """Evenly spaced query indices (deterministic, spread over identities).

    Args:
        num_query (int): Q.
        num (int): how many; <= 0 or >= Q: all.
    Returns:
        list[int]
    """
    if num <= 0 or num >= num_query:
        return list(range(num_query))
    return sorted({int(i) for i in np.linspace(0, num_query - 1, num).round()})


def _features_from_npz(path, paths):
    """Rows of an ``.npz`` from ``python -m reidzoo.extract`` for ``paths``, in order."""
    from reidzoo.extract import load_features

    data = load_features(path)

    def key(p):
        return os.path.normcase(os.path.realpath(p))

    index = {key(n): i for i, n in enumerate(data["names"])}
    rows = [index.get(key(p)) for p in paths]
    missing = [p for p, r in zip(paths, rows) if r is None]
    if missing:
        raise ValueError(
            f"features file '{path}' has no row for {len(missing)} of the {len(paths)} test "
            f"images, e.g. {missing[:3]}; extract them with python -m reidzoo.extract"
        )
    return torch.from_numpy(np.asarray(data["features"], dtype=np.float32)[rows]), data


def _safe_name(path):
    stem = os.path.splitext(os.path.basename(path))[0]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)


def visualize_dataset(
    cfg, name, output_dir, extractor=None, features=None, num_queries=8, topk=10, layout=None
):
    """Rank-list PNGs, the CMC curve PNG and ``ranks.json`` of one test set.

    Args:
        cfg (CfgNode): the config (datasets, ``TEST.*``).
        name (str): registered dataset name.
        output_dir (str): folder to write into (created).
        extractor (FeatureExtractor | None): computes features; required without ``features``.
        features (str | None): an ``.npz`` from ``python -m reidzoo.extract`` to use instead.
        num_queries (int): queries drawn (evenly spaced; <= 0: all).
        topk (int): gallery images per figure.
        layout (RankLayout | None): figure geometry.
    Returns:
        dict: the content of ``ranks.json``.
    """
    from reidzoo.data.build import build_dataset
    from reidzoo.evaluation import rank_distmat

    if extractor is None and features is None:
        raise ValueError("visualize_dataset needs an extractor or a features file")
    layout = layout or RankLayout()
    data = build_dataset(cfg, name)
    query, gallery = list(data.query), list(data.gallery)
    if not query or not gallery:
        raise ValueError(f"{name}: the test set has {len(query)} queries, {len(gallery)} gallery")
    paths = [item[0] for item in query + gallery]
    pids = np.asarray([item[1] for item in query + gallery])
    camids = np.asarray([item[2] for item in query + gallery])
    nq = len(query)
    if features is not None:
        feats, meta = _features_from_npz(features, paths)
        if meta.get("normalized") and cfg.TEST.METRIC == "euclidean":
            logger.warning(
                "%s holds L2-normalised features: Euclidean distances differ from the "
                "evaluation's (raw features); extract with --no-normalize to match it",
                features,
            )
    else:
        feats = extractor.extract(paths, as_tensor=True).features
    dist = compute_distances(cfg, feats[:nq], feats[nq:])
    q_pids, g_pids, q_camids, g_camids = pids[:nq], pids[nq:], camids[:nq], camids[nq:]
    chunked = cfg.TEST.get("EVALUATOR", "ReidEvaluator") == "ChunkedReidEvaluator"
    result = rank_distmat(
        dist,
        q_pids,
        g_pids,
        q_camids,
        g_camids,
        max_rank=min(50, len(gallery)),
        use_metric_cuhk03=bool(chunked and cfg.TEST.CHUNKED.USE_METRIC_CUHK03),
    )
    os.makedirs(output_dir, exist_ok=True)
    cmc_title = f"{name}: Rank-1 {result.cmc[0] * 100:.1f}%  mAP {result.mAP * 100:.1f}%"
    plot_cmc(result.cmc, os.path.join(output_dir, "cmc.png"), cmc_title, cfg.TEST.METRIC)

    drawn = []
    for qi in select_queries(nq, num_queries):
        order, correct = rank_gallery(dist[qi], q_pids[qi], q_camids[qi], g_pids, g_camids, topk)
        title = f"{os.path.basename(paths[qi])}  (id {q_pids[qi]})"
        figure = draw_ranks(
            paths[qi],
            [paths[nq + g] for g in order],
            dist[qi, order],
            correct,
            layout,
            title,
        )
        png = f"query_{qi:05d}_{_safe_name(paths[qi])}.png"
        common.save_png(figure, os.path.join(output_dir, png))
        drawn.append(
            {
                "index": int(qi),
                "name": paths[qi],
                "pid": q_pids[qi].item(),
                "camid": q_camids[qi].item(),
                "png": png,
                "topk": [
                    {
                        "name": paths[nq + g],
                        "pid": g_pids[g].item(),
                        "camid": g_camids[g].item(),
                        "distance": float(dist[qi, g]),
                        "correct": bool(ok),
                    }
                    for g, ok in zip(order, correct)
                ],
            }
        )
    summary = {
        "dataset": name,
        "metric": cfg.TEST.METRIC,
        "num_query": nq,
        "num_gallery": len(gallery),
        "num_valid_queries": int(result.num_valid),
        "cmc": [float(x) for x in result.cmc],
        "mAP": float(result.mAP),
        "mINP": float(result.mINP),
        "features": features or "extracted",
        "queries": drawn,
    }
    from reidzoo.checkpoint import atomic_write

    atomic_write(
        os.path.join(output_dir, "ranks.json"),
        lambda f: json.dump(summary, f, indent=1),
        mode="w",
    )
    logger.info(
        "%s: %d rank lists, cmc.png and ranks.json written to %s (Rank-1 %.1f%%, mAP %.1f%%)",
        name,
        len(drawn),
        output_dir,
        result.cmc[0] * 100,
        result.mAP * 100,
    )
    return summary


def run(
    config,
    output_dir,
    checkpoint=None,
    features=None,
    opts=(),
    num_queries=8,
    topk=10,
    datasets=None,
    layout=None,
    device=None,
):
    """Visualise the retrieval of every test set of a config.

    Args:
        config (str | CfgNode): config file, registered model name or config.
        output_dir (str): results go to ``output_dir/<dataset>/``.
        checkpoint (str | None): weights; None: ``MODEL.WEIGHTS`` (unused with ``features``).
        features (str | None): ``.npz`` of precomputed features (see :func:`visualize_dataset`).
        opts (Sequence[str]): ``KEY VALUE`` overrides.
        num_queries (int): queries drawn per test set (<= 0: all).
        topk (int): gallery images per figure.
        datasets (Sequence[str] | None): test sets; None: ``DATASETS.TESTS``.
        layout (RankLayout | None): figure geometry.
        device (str | None): device for the model; None: ``MODEL.DEVICE`` (CPU fallback).
    Returns:
        dict[str, dict]: dataset -> its ``ranks.json`` content.
    """
    from reidzoo.inference import FeatureExtractor, load_config

    if topk < 1:
        raise ValueError(f"--topk must be >= 1, got {topk}")
    cfg = load_config(config, opts)
    extractor = None
    if features is None:
        extractor = FeatureExtractor(cfg, checkpoint=checkpoint, device=device, normalize=False)
        cfg = extractor.cfg
    names = list(datasets or cfg.DATASETS.TESTS)
    if not names:
        raise ValueError("no test set: DATASETS.TESTS is empty and no --dataset was given")
    out = {}
    for name in names:
        out[name] = visualize_dataset(
            cfg,
            name,
            os.path.join(output_dir, name),
            extractor=extractor,
            features=features,
            num_queries=num_queries,
            topk=topk,
            layout=layout,
        )
    return out


def add_parser(subparsers):
    """Add the ``ranks`` sub-command to a ``python -m reidzoo.visualize`` parser.

    Args:
        subparsers (argparse._SubParsersAction): from ``parser.add_subparsers()``.
    Returns:
        argparse.ArgumentParser: the ``ranks`` parser (its ``func`` is :func:`main_from_args`).
    """
    import argparse

    p = subparsers.add_parser(
        "ranks",
        help="rank-list PNGs per query and the CMC curve of the test sets",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--config-file", required=True, metavar="FILE|NAME", help="config YAML or model name"
    )
    p.add_argument("--output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--checkpoint", default=None, metavar="PTH", help="weights (MODEL.WEIGHTS)")
    p.add_argument(
        "--features", default=None, metavar="NPZ", help="precomputed features (reidzoo.extract)"
    )
    p.add_argument("--num-queries", type=int, default=8, help="queries drawn (0: all)")
    p.add_argument("--topk", type=int, default=10, help="gallery images per query")
    p.add_argument(
        "--dataset", action="append", default=None, help="test set (repeatable; DATASETS.TESTS)"
    )
    p.add_argument(
        "--cell-size", type=int, nargs=2, default=[128, 64], metavar=("H", "W"),
        help="displayed image size",
    )  # fmt: skip
    p.add_argument("--device", default=None, help="default MODEL.DEVICE (CPU without CUDA)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    p.set_defaults(func=main_from_args)
    return p


def main_from_args(args):
    """Run the ``ranks`` sub-command.

    Args:
        args (argparse.Namespace): parsed by the parser of :func:`add_parser`.
    Returns:
        int: 0 on success; 1 on an error a user can fix (printed as ``error: ...``).
    """
    import sys

    from reidzoo.checkpoint import CheckpointMismatchError, UnsafeCheckpointError
    from reidzoo.inference import checkpoint_opts

    try:
        run(
            args.config_file,
            args.output,
            features=args.features,
            opts=checkpoint_opts(args.checkpoint, args.opts),
            num_queries=args.num_queries,
            topk=args.topk,
            datasets=args.dataset,
            layout=RankLayout(cell_size=tuple(args.cell_size)),
            device=args.device,
        )
    except (OSError, ValueError, KeyError, CheckpointMismatchError, UnsafeCheckpointError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 1
    return 0
