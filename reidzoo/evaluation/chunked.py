"""Exact, memory-bounded CMC / mAP / mINP: fast-reid's numbers without the full matrices.

fast-reid's ``ReidEvaluator`` builds the ``[Q, G]`` distance matrix, argsorts all of it and
loops over queries in Python (``fastreid.evaluation.rank.eval_market1501`` when its Cython
extension is not built). Here queries are processed in row blocks:

1. the distance block is computed with the very torch operations of
   ``fastreid.utils.compute_dist`` (``F.normalize`` and ``1 - mm`` for cosine, the squared norms
   plus ``addmm_(beta=1, alpha=-2)`` for Euclidean). Whether a row block is bit-identical to
   fast-reid's full matrix is the BLAS kernel's choice: on the AMD EPYC (AVX2) CPUs this was
   written on it is, for blocks of >= 12 rows (so blocks are kept at >= :data:`MIN_BLOCK` rows,
   or the whole query set); on an Intel Xeon with AVX-512 sgemm rounds by row count and a block
   differs from the full matrix by a few ulp (seen: 2 ulp with 2048-d features), which can swap
   two near-tied gallery images. The ranking below is exact for the distances it is given;
2. all fast-reid's metrics of a query follow from the positions of its valid matches (its
   identity, other cameras) among the kept gallery images. A position is the number of
   other-identity images closer than the match plus the number of valid matches before it, so
   it is counted with two vectorised comparisons per valid match instead of sorting the row;
3. where an image of another identity has exactly the distance of a valid match, the position
   depends on how ``np.argsort`` orders ties: that row is sorted with ``np.argsort`` and its
   default kind, fast-reid's own call on the same row (rows sort independently), so ties come
   out in fast-reid's order. CUHK03 single-gallery-shot evaluation sorts every row.

Rows are split over ``num_threads`` threads (numpy releases the GIL while it compares and
sorts). Memory per block is ``block x G`` distances plus masks and, for sorted rows, their
indices (budgeted at :data:`BYTES_PER_PAIR` per query-gallery pair), independent of Q.
"""

import copy
import itertools
import logging
import math
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from fastreid.evaluation.evaluator import DatasetEvaluator
from fastreid.utils import comm

from reidzoo.evaluation.rerank import (
    check_full_matrix_memory,
    check_rerank_memory,
    rerank_distance,
)

logger = logging.getLogger(__name__)

#: Smallest query block: on AVX2 CPUs sgemm rounds row blocks of fewer than 12 rows differently
#: from the full matrix (at >= 12 rows the blocks were bit-identical there; see the module text).
MIN_BLOCK = 32
#: Working bytes per query-gallery pair in one block (float32 distance, int64 order, masks).
BYTES_PER_PAIR = 24
#: Random draws per query in CUHK03 single-gallery-shot evaluation (fast-reid's num_repeats).
CUHK03_REPEATS = 10


@dataclass
class RankResult:
    """Ranking metrics of one evaluation.

    Attributes:
        cmc (np.ndarray): [max_rank] float32, fraction of valid queries with a correct match
            within rank r+1 (fast-reid's ``cmc``).
        all_AP (np.ndarray): [num_valid] float64 average precision per valid query.
        all_INP (np.ndarray): [num_valid] float64 inverse negative penalty per valid query.
        num_valid (int): queries with at least one valid match.
        num_skipped (int): queries skipped because no gallery image of their identity remains
            after removing same-identity same-camera images.
        valid (np.ndarray): [Q] bool, which queries were valid.
        num_sorted_rows (int): queries whose gallery row was fully argsorted (ties between a
            valid match and another identity, CUHK03 mode, GPU), the others were counted.
    """

    cmc: np.ndarray
    all_AP: np.ndarray
    all_INP: np.ndarray
    num_valid: int
    num_skipped: int
    valid: np.ndarray
    num_sorted_rows: int = 0

    @property
    def mAP(self):
        """float: mean AP over valid queries (``np.mean(all_AP)``)."""
        return np.mean(self.all_AP)

    @property
    def mINP(self):
        """float: mean INP over valid queries."""
        return np.mean(self.all_INP)


def plan_query_blocks(num_query, num_gallery, query_block=0, memory_budget_mb=512):
    """Split ``range(num_query)`` into row blocks of balanced size.

    Args:
        num_query (int): Q.
        num_gallery (int): G.
        query_block (int): rows per block; <= 0 derives it from ``memory_budget_mb``.
        memory_budget_mb (float): working memory of one block in MiB.
    Returns:
        list[tuple[int, int]]: ``(start, stop)`` pairs covering ``[0, num_query)``; every block
        has at least ``MIN_BLOCK // 2`` rows unless there is a single block.
    """
    if query_block <= 0:
        per_row = BYTES_PER_PAIR * max(int(num_gallery), 1)
        query_block = int(memory_budget_mb * 2**20 // per_row)
    query_block = max(int(query_block), MIN_BLOCK)
    if num_query <= query_block:
        return [(0, int(num_query))] if num_query > 0 else []
    n = math.ceil(num_query / query_block)
    bounds = [i * num_query // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class DistanceBlocks:
    """Row blocks of fast-reid's ``build_dist(query, gallery, metric)``.

    Args:
        query_features (Tensor): [Q, D].
        gallery_features (Tensor): [G, D].
        metric (str): ``"cosine"`` (``1 - <q/|q|, g/|g|>``) or ``"euclidean"`` (squared L2,
            as fast-reid's ``compute_euclidean_distance``).
        device (str | torch.device | None): where to compute; None keeps the features' device.
    """

    def __init__(self, query_features, gallery_features, metric="cosine", device=None):
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', got '{metric}'")
        self.metric = metric
        q, g = query_features, gallery_features
        if device is not None:
            q, g = q.to(device), g.to(device)
        with torch.no_grad():
            if metric == "cosine":
                self.q = F.normalize(q, p=2, dim=1)
                self.g = F.normalize(g, p=2, dim=1)
            else:
                self.q, self.g = q, g
                self.q2 = torch.pow(q, 2).sum(dim=1, keepdim=True)  # [Q, 1]
                self.g2 = torch.pow(g, 2).sum(dim=1, keepdim=True).t()  # [1, G]

    @property
    def shape(self):
        """tuple[int, int]: (Q, G)."""
        return (self.q.shape[0], self.g.shape[0])

    @torch.no_grad()
    def block(self, start, stop):
        """Distances of queries ``start:stop`` to the whole gallery.

        Args:
            start (int): first query row.
            stop (int): one past the last row.
        Returns:
            Tensor: [stop - start, G] float32 on the compute device.
        """
        q = self.q[start:stop]
        if self.metric == "cosine":
            # -(x) + 1 rounds exactly as fast-reid's 1 - x, without a second [B, G] buffer
            return torch.mm(q, self.g.t()).neg_().add_(1)
        m, n = q.shape[0], self.g.shape[0]
        dist = self.q2[start:stop].expand(m, n) + self.g2.expand(m, n)
        return dist.addmm_(q, self.g.t(), beta=1, alpha=-2)


def _argsort_rows(dist, pool, num_threads):
    """``np.argsort(dist, axis=1)`` (default kind, fast-reid's call), rows split over threads.

    Args:
        dist (np.ndarray): [B, G] distances.
        pool (ThreadPoolExecutor | None)
        num_threads (int)
    Returns:
        list[tuple[int, np.ndarray]]: ``(row offset, order [b, G] intp)`` pieces covering the
        rows in order (one piece per thread; no concatenated copy).
    """
    spans = _split_rows(dist.shape[0], pool, num_threads)
    orders = _map(pool, lambda span: np.argsort(dist[span[0] : span[1]], axis=1), spans)
    return [(span[0], order) for span, order in zip(spans, orders)]


def _split_rows(b, pool, num_threads):
    if pool is None or num_threads <= 1 or b < 2 * num_threads:
        return [(0, b)]
    cuts = [i * b // num_threads for i in range(num_threads + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def _map(pool, fn, items):
    return (
        list(pool.map(fn, items)) if pool is not None and len(items) > 1 else list(map(fn, items))
    )


def _same_identity(q_pids, q_camids, g_pids, g_camids):
    """Gallery images of each query's identity, in gallery order.

    Args:
        q_pids, q_camids (np.ndarray): [B] query identities and cameras.
        g_pids, g_camids (np.ndarray): [G] gallery identities and cameras.
    Returns:
        tuple[np.ndarray, np.ndarray, np.ndarray]: ``cols`` [K] gallery index of each
        same-identity image, ``kept`` [K] False where fast-reid removes it (same camera), and
        ``bounds`` [B + 1]: query i owns entries ``bounds[i]:bounds[i + 1]``.
    """
    rows, cols = np.nonzero(g_pids[None, :] == q_pids[:, None])
    kept = g_camids[cols] != q_camids[rows]
    return cols, kept, np.searchsorted(rows, np.arange(len(q_pids) + 1))


def _stats_from_positions(pos):
    """AP, first-hit rank and INP from the sorted 0-based positions [m] of a query's valid
    matches among the kept gallery images (fast-reid's definitions)."""
    m = len(pos)
    ap = np.sum(np.arange(1, m + 1) / (pos + 1.0)) / m
    return ap, pos[0], m / (pos[-1] + 1.0)


class _RowStats:
    """Per-query results of one block: ``n_rel`` valid matches, ``ap``, ``first`` (0-based rank
    of the first valid match) and ``inp``; zeros for queries without a valid match."""

    def __init__(self, b):
        self.n_rel = np.zeros(b, dtype=np.int64)
        self.ap = np.zeros(b)
        self.first = np.zeros(b, dtype=np.int64)
        self.inp = np.zeros(b)
        self.sorted_rows = 0

    def set(self, i, pos):
        if len(pos):
            self.n_rel[i] = len(pos)
            self.ap[i], self.first[i], self.inp[i] = _stats_from_positions(pos)


def _positions_from_order(order_row, cols, kept, inv):
    """Sorted positions among the kept images of the valid matches, given a full ranking.

    Args:
        order_row (np.ndarray): [G] gallery indices by increasing distance.
        cols (np.ndarray): [k] the query's same-identity gallery indices.
        kept (np.ndarray): [k] bool, not removed by the same-camera rule.
        inv (np.ndarray): [G] scratch buffer (overwritten with the inverse permutation).
    Returns:
        np.ndarray: [m] positions.
    """
    inv[order_row] = np.arange(len(order_row))
    spos = inv[cols]
    o = np.argsort(spos)
    spos, k = spos[o], kept[o]
    removed_before = np.cumsum(~k) - ~k
    return (spos - removed_before)[k]


def _stats_from_order(order, q_pids, q_camids, g_pids, g_camids):
    """Per-query statistics from full rankings (fast-reid's ``eval_market1501`` per query).

    Args:
        order (np.ndarray): [B, G] gallery indices by increasing distance.
        q_pids, q_camids (np.ndarray): [B] query identities and cameras.
        g_pids, g_camids (np.ndarray): [G] gallery identities and cameras.
    Returns:
        _RowStats
    """
    cols, kept, bounds = _same_identity(q_pids, q_camids, g_pids, g_camids)
    out = _RowStats(len(order))
    inv = np.empty(order.shape[1], dtype=np.intp)
    for i in range(len(order)):
        lo, hi = bounds[i], bounds[i + 1]
        out.set(i, _positions_from_order(order[i], cols[lo:hi], kept[lo:hi], inv))
    out.sorted_rows = len(order)
    return out


class _TieFinder:
    """Finds whether an image of another identity has exactly the distance of a valid match.

    The exact test would compare the row with every valid match's distance. Instead the low 16
    bits of each distance's binary representation index a 64 Ki-entry table marking the valid
    matches' low bits: one pass over the row leaves a few candidates, which are then compared
    exactly. Equal floats have equal bits except +0.0 / -0.0, which the caller tests directly.

    Args:
        g (int): row length.
        dtype (np.dtype): distance dtype (float32 or float64).
    """

    def __init__(self, g, dtype):
        self.uint = np.dtype(f"u{np.dtype(dtype).itemsize}")
        self.table = np.zeros(1 << 16, dtype=bool)
        self.keys = np.empty(g, dtype=self.uint)
        self.hits = np.empty(g, dtype=bool)

    def __call__(self, row, s, same):
        """
        Args:
            row (np.ndarray): [G] distances of one query.
            s (np.ndarray): [m] its valid matches' distances (no NaN).
            same (np.ndarray): [k] distances of all its same-identity images (removed ones too).
        Returns:
            bool
        """
        if not np.all(s):  # a zero distance: +0.0 == -0.0 with different bits, compare exactly
            return np.count_nonzero(np.isin(row, s)) > np.count_nonzero(np.isin(same, s))
        low = s.view(self.uint) & 0xFFFF
        self.table[low] = True
        np.bitwise_and(row.view(self.uint), 0xFFFF, out=self.keys)
        np.take(self.table, self.keys, out=self.hits, mode="clip")
        self.table[low] = False
        cand = row[self.hits]
        return np.count_nonzero(np.isin(cand, s)) > np.count_nonzero(np.isin(same, s))


def _stats_by_counting(dist, q_pids, q_camids, g_pids, g_camids):
    """The statistics of :func:`_stats_from_order`, without sorting the rows where possible.

    A valid match's position among the kept gallery images is the number of other-identity
    images closer than it plus the number of valid matches before it; as a set, the positions
    of a query's valid matches do not depend on the order among tied matches. They depend on
    ``np.argsort``'s tie order only when an image of another identity has exactly the distance
    of a valid match: such rows (and rows with a NaN valid match) are argsorted as fast-reid
    does. Counting costs one comparison per gallery image and distinct valid-match distance,
    sorting ``O(G log G)``; random features tie often (cosine distances crowd around 1), real
    ones less.

    Args:
        dist (np.ndarray): [B, G] distances.
        q_pids, q_camids (np.ndarray): [B]
        g_pids, g_camids (np.ndarray): [G]
    Returns:
        _RowStats
    """
    b, g = dist.shape
    out = _RowStats(b)
    cols, kept, bounds = _same_identity(q_pids, q_camids, g_pids, g_camids)
    buf = np.empty(g, dtype=bool)
    inv = np.empty(g, dtype=np.intp)
    has_tie = _TieFinder(g, dist.dtype)
    for i in range(b):
        lo, hi = bounds[i], bounds[i + 1]
        row = dist[i]
        same = row[cols[lo:hi]]  # every same-identity image, removed ones included
        s = np.sort(same[kept[lo:hi]])  # the valid matches' distances
        if len(s) == 0:
            continue
        if np.isnan(s[-1]) or has_tie(row, s, same):
            # another identity at exactly a valid match's distance: np.argsort's order decides
            out.set(i, _positions_from_order(np.argsort(row), cols[lo:hi], kept[lo:hi], inv))
            out.sorted_rows += 1
            continue
        same.sort()
        lt = np.zeros(len(s), dtype=np.int64)
        for k in np.flatnonzero(np.r_[True, s[1:] != s[:-1]]):  # each distinct distance
            lt[k] = np.count_nonzero(np.less(row, s[k], out=buf))
        lt = np.maximum.accumulate(lt)  # repeated distances take the count of their first
        out.set(i, lt - np.searchsorted(same, s, "left") + np.arange(len(s)))
    return out


def _cuhk03_cmc(order_row, q_pid, q_camid, g_pids, g_camids, max_rank):
    """fast-reid's ``eval_cuhk03`` CMC of one query: same draws from ``np.random``.

    fast-reid draws ``np.random.choice(idxs)`` for each gallery identity in order of first
    appearance, ten times; ``np.random.randint(0, sizes)`` consumes the legacy generator in the
    same way and returns the same indices.

    Args:
        order_row (np.ndarray): [G] gallery indices by increasing distance.
        q_pid (int): query identity.
        q_camid (int): query camera.
        g_pids (np.ndarray): [G] gallery identities.
        g_camids (np.ndarray): [G] gallery cameras.
        max_rank (int): CMC length.
    Returns:
        np.ndarray | None: [min(max_rank, identities)] float32, None when the query has no valid
        match (nothing drawn, as in fast-reid).
    """
    pids = g_pids[order_row]
    keep = ~((pids == q_pid) & (g_camids[order_row] == q_camid))
    kept_pids = pids[keep]
    if not np.any(kept_pids == q_pid):
        return None
    uniq, first, inverse = np.unique(kept_pids, return_index=True, return_inverse=True)
    group_of_uniq = np.empty(len(uniq), dtype=np.intp)
    group_of_uniq[np.argsort(first)] = np.arange(len(uniq))
    group = group_of_uniq[inverse]  # group index in order of first appearance
    members = np.argsort(group, kind="stable")  # kept positions grouped, ascending in a group
    sizes = np.bincount(group, minlength=len(uniq))
    starts = np.cumsum(sizes) - sizes
    q_group = group_of_uniq[np.searchsorted(uniq, q_pid)]
    draws = np.random.randint(0, np.tile(sizes, CUHK03_REPEATS)).reshape(CUHK03_REPEATS, -1)
    chosen = members[starts[None, :] + draws]  # [repeats, groups] kept positions
    hit = (chosen < chosen[:, q_group : q_group + 1]).sum(axis=1)  # masked rank of the match
    length = min(len(uniq), max_rank)
    cmc = 0.0
    for h in hit:
        cmc += (np.arange(length) >= h).astype(np.float32)
    cmc /= CUHK03_REPEATS
    return cmc


class _Ranker:
    """Accumulates per-query results over blocks and finishes fast-reid's averages."""

    def __init__(self, q_pids, q_camids, g_pids, g_camids, max_rank, use_metric_cuhk03):
        self.q_pids = np.asarray(q_pids)
        self.q_camids = np.asarray(q_camids)
        self.g_pids = np.asarray(g_pids)
        self.g_camids = np.asarray(g_camids)
        if max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {max_rank}")
        self.max_rank = int(max_rank)
        self.cuhk03 = bool(use_metric_cuhk03)
        nq = len(self.q_pids)
        self.ap = np.zeros(nq, dtype=np.float64)
        self.inp = np.zeros(nq, dtype=np.float64)
        self.first = np.zeros(nq, dtype=np.int64)
        self.valid = np.zeros(nq, dtype=bool)
        self.cuhk_rows = [None] * nq if self.cuhk03 else None
        self.sorted_rows = 0

    def add_stats(self, start, stats):
        """Store the :class:`_RowStats` of queries ``start : start + len(stats.n_rel)``."""
        sl = slice(start, start + len(stats.n_rel))
        self.valid[sl] = stats.n_rel > 0
        self.ap[sl], self.first[sl], self.inp[sl] = stats.ap, stats.first, stats.inp
        self.sorted_rows += stats.sorted_rows

    def add_order(self, start, order):
        """Rank queries ``start : start + len(order)`` given their gallery order [B, G]."""
        stop = start + len(order)
        qp, qc = self.q_pids[start:stop], self.q_camids[start:stop]
        self.add_stats(start, _stats_from_order(order, qp, qc, self.g_pids, self.g_camids))
        if self.cuhk03:
            for i in range(len(order)):
                self.cuhk_rows[start + i] = _cuhk03_cmc(
                    order[i], qp[i], qc[i], self.g_pids, self.g_camids, self.max_rank
                )

    def add_distances(self, start, dist, pool, num_threads):
        """Rank queries ``start : start + len(dist)`` from their CPU distances [B, G]."""
        if self.cuhk03:  # needs every row's full order (and its draws in query order)
            for offset, order in _argsort_rows(dist, pool, num_threads):
                self.add_order(start + offset, order)
            return

        def work(span):
            a, b = span
            qp, qc = self.q_pids[start + a : start + b], self.q_camids[start + a : start + b]
            return a, _stats_by_counting(dist[a:b], qp, qc, self.g_pids, self.g_camids)

        for offset, stats in _map(pool, work, _split_rows(len(dist), pool, num_threads)):
            self.add_stats(start + offset, stats)

    def result(self):
        """Returns:
        RankResult"""
        num_valid = int(self.valid.sum())
        if num_valid == 0:
            raise ValueError(
                f"none of the {len(self.valid)} queries has a valid match in the gallery "
                "(fast-reid: 'all query identities do not appear in gallery')"
            )
        if self.cuhk03:
            rows = [r for r in self.cuhk_rows if r is not None]
            all_cmc = np.asarray(rows).astype(np.float32)
            cmc = all_cmc.sum(0) / float(num_valid)
        else:
            first = self.first[self.valid]
            hits = np.bincount(np.minimum(first, self.max_rank), minlength=self.max_rank + 1)
            cmc = np.cumsum(hits[: self.max_rank]).astype(np.float32) / float(num_valid)
        if len(cmc) < self.max_rank:  # reidzoo.compat pads fast-reid's curve the same way
            cmc = np.concatenate([cmc, np.full(self.max_rank - len(cmc), cmc[-1], cmc.dtype)])
        return RankResult(
            cmc=cmc,
            all_AP=self.ap[self.valid],
            all_INP=self.inp[self.valid],
            num_valid=num_valid,
            num_skipped=len(self.valid) - num_valid,
            valid=self.valid.copy(),
            num_sorted_rows=self.sorted_rows,
        )


def _resolve_threads(num_threads):
    return int(num_threads) if num_threads and num_threads > 0 else torch.get_num_threads()


def _rank_blocks(blocks, get_block, ranker, num_threads):
    """Rank every ``(start, stop)`` block; ``get_block(start, stop)`` gives its distances."""
    num_threads = _resolve_threads(num_threads)
    pool = ThreadPoolExecutor(num_threads) if num_threads > 1 else None
    try:
        for start, stop in blocks:
            dist = get_block(start, stop)
            if isinstance(dist, torch.Tensor):
                if dist.device.type != "cpu":
                    # GPU: sort there (ties in index order), move only the order.
                    ranker.add_order(start, torch.sort(dist, dim=1, stable=True)[1].cpu().numpy())
                    continue
                dist = dist.numpy()
            ranker.add_distances(start, dist, pool, num_threads)
            del dist
    finally:
        if pool is not None:
            pool.shutdown()
    return ranker.result()


def rank_features(
    query_features,
    gallery_features,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    metric="cosine",
    max_rank=50,
    query_block=0,
    memory_budget_mb=512,
    use_metric_cuhk03=False,
    device=None,
    num_threads=0,
):
    """CMC, AP and INP from features, block by block (fast-reid's numbers, bounded memory).

    Equals ``evaluate_rank(build_dist(query, gallery, metric), ...)`` of fast-reid.

    Args:
        query_features (Tensor): [Q, D] float32.
        gallery_features (Tensor): [G, D] float32.
        q_pids (np.ndarray): [Q] int identities.
        g_pids (np.ndarray): [G] int identities.
        q_camids (np.ndarray): [Q] int cameras.
        g_camids (np.ndarray): [G] int cameras.
        metric (str): ``"cosine"`` or ``"euclidean"``.
        max_rank (int): CMC length.
        query_block (int): query rows per block; 0 derives it from ``memory_budget_mb``.
        memory_budget_mb (float): working memory of a block, MiB.
        use_metric_cuhk03 (bool): CUHK03 single-gallery-shot CMC (draws from ``np.random``).
        device (str | torch.device | None): device of the distance blocks; None: the features'.
        num_threads (int): CPU sorting threads; 0: ``torch.get_num_threads()``.
    Returns:
        RankResult
    """
    blocks_src = DistanceBlocks(query_features, gallery_features, metric, device)
    nq, ng = blocks_src.shape
    blocks = plan_query_blocks(nq, ng, query_block, memory_budget_mb)
    ranker = _Ranker(q_pids, q_camids, g_pids, g_camids, max_rank, use_metric_cuhk03)
    return _rank_blocks(blocks, blocks_src.block, ranker, num_threads)


def rank_distmat(
    distmat,
    q_pids,
    g_pids,
    q_camids,
    g_camids,
    max_rank=50,
    query_block=0,
    memory_budget_mb=512,
    use_metric_cuhk03=False,
    num_threads=0,
):
    """The same metrics from a given distance matrix (re-ranked distances, tests).

    Equals fast-reid's ``evaluate_rank(distmat, ...)``.

    Args:
        distmat (np.ndarray | Tensor): [Q, G] distances.
        q_pids (np.ndarray): [Q]
        g_pids (np.ndarray): [G]
        q_camids (np.ndarray): [Q]
        g_camids (np.ndarray): [G]
        max_rank (int): CMC length.
        query_block (int): rows per block; 0 derives it from ``memory_budget_mb``.
        memory_budget_mb (float): working memory of a block, MiB.
        use_metric_cuhk03 (bool): CUHK03 single-gallery-shot CMC.
        num_threads (int): sorting threads; 0: ``torch.get_num_threads()``.
    Returns:
        RankResult
    """
    if isinstance(distmat, torch.Tensor):
        distmat = distmat.detach().cpu().numpy()
    nq, ng = distmat.shape
    blocks = plan_query_blocks(nq, ng, query_block, memory_budget_mb)
    ranker = _Ranker(q_pids, q_camids, g_pids, g_camids, max_rank, use_metric_cuhk03)
    return _rank_blocks(blocks, lambda a, b: distmat[a:b], ranker, num_threads)


@torch.no_grad()
def aqe_chunked(query_feat, gallery_feat, qe_times=1, qe_k=10, alpha=3.0, block=1024):
    """fast-reid's average query expansion (``fastreid.evaluation.query_expansion.aqe``) with
    the ``[N, N]`` similarity computed ``block`` rows at a time; same results.

    Args:
        query_feat (Tensor): [Q, D] float32, CPU.
        gallery_feat (Tensor): [G, D] float32, CPU.
        qe_times (int): expansion rounds.
        qe_k (int): neighbours combined.
        alpha (float): weight exponent.
        block (int): similarity rows per block (>= MIN_BLOCK).
    Returns:
        tuple[Tensor, Tensor]: expanded query [Q, D] and gallery [G, D] features.
    """
    num_query = query_feat.shape[0]
    all_feat = torch.cat((query_feat, gallery_feat), dim=0)
    norm_feat = F.normalize(all_feat, p=2, dim=1)
    all_feat = all_feat.numpy()
    n = all_feat.shape[0]
    for _ in range(qe_times):
        out = []
        for start, stop in plan_query_blocks(n, n, query_block=block):
            sims = torch.mm(norm_feat[start:stop], norm_feat.t()).numpy()
            for sim in sims:
                init_rank = np.argpartition(-sim, range(1, qe_k + 1))
                weights = sim[init_rank[:qe_k]].reshape((-1, 1))
                weights = np.power(weights, alpha)
                out.append(np.mean(all_feat[init_rank[:qe_k], :] * weights, axis=0))
        all_feat = np.stack(out, axis=0)
        norm_feat = F.normalize(torch.from_numpy(all_feat), p=2, dim=1)
    return torch.from_numpy(all_feat[:num_query]), torch.from_numpy(all_feat[num_query:])


class ChunkedReidEvaluator(DatasetEvaluator):
    """A drop-in for fast-reid's ``ReidEvaluator`` with memory bounded by query blocks.

    Same ``reset`` / ``process`` / ``evaluate`` protocol and the same result keys and values
    (``Rank-k`` for ``TEST.CHUNKED.RANKS``, ``mAP``, ``mINP``, ``metric``, and ``TPR@FPR=...``
    with ``TEST.ROC.ENABLED``). ``TEST.AQE`` runs block-wise; ``TEST.RERANK`` and
    ``TEST.ROC`` need the full distance matrix and are refused with the estimated memory above
    their ``MEMORY_BUDGET_GB``. The number of queries without a valid match is logged and kept
    in ``self.last_result.num_skipped``.

    Args:
        cfg (CfgNode): config with ``TEST.CHUNKED.*``.
        num_query (int): the first ``num_query`` processed images are queries.
        output_dir (str | None): unused (kept for fast-reid's signature).
    """

    def __init__(self, cfg, num_query, output_dir=None):
        self.cfg = cfg
        self._num_query = num_query
        self._output_dir = output_dir
        self._cpu_device = torch.device("cpu")
        c = cfg.TEST.CHUNKED
        self.ranks = [int(r) for r in c.RANKS]
        self.max_rank = max([int(c.MAX_RANK)] + self.ranks)
        if any(r < 1 for r in self.ranks):
            raise ValueError(f"TEST.CHUNKED.RANKS must be >= 1, got {list(c.RANKS)}")
        device = c.DEVICE or cfg.MODEL.DEVICE
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            device = "cpu"
        self.device = torch.device(device)
        self.last_result = None
        self._predictions = []

    def reset(self):
        self._predictions = []

    def process(self, inputs, outputs):
        """Keep one batch's features, identities and cameras on the CPU.

        Args:
            inputs (dict): fast-reid batch with "targets" [N] and "camids" [N].
            outputs (Tensor): [N, D] features.
        """
        self._predictions.append(
            {
                "feats": outputs.to(self._cpu_device, torch.float32),
                "pids": inputs["targets"].to(self._cpu_device),
                "camids": inputs["camids"].to(self._cpu_device),
            }
        )

    def _collect(self):
        if comm.get_world_size() > 1:
            comm.synchronize()
            predictions = comm.gather(self._predictions, dst=0)
            predictions = list(itertools.chain(*predictions))
            if not comm.is_main_process():
                return None
        else:
            predictions = self._predictions
        if len(predictions) != 1:
            merged = {
                k: torch.cat([p[k] for p in predictions], dim=0)
                for k in ("feats", "pids", "camids")
            }
            # keep one concatenated copy, not the batches as well
            predictions.clear()
            predictions.append(merged)
            self._predictions = predictions
        p = predictions[0]
        return p["feats"], p["pids"].numpy(), p["camids"].numpy()

    def evaluate(self):
        """Returns:
        OrderedDict: fast-reid's result keys ({} on non-main processes)."""
        collected = self._collect()
        if collected is None:
            return {}
        features, pids, camids = collected
        nq = self._num_query
        qf, gf = features[:nq], features[nq:]
        q_pids, g_pids = pids[:nq], pids[nq:]
        q_camids, g_camids = camids[:nq], camids[nq:]
        cfg, c = self.cfg, self.cfg.TEST.CHUNKED
        metric = cfg.TEST.METRIC
        tic = time.perf_counter()

        if cfg.TEST.AQE.ENABLED:
            logger.info("Test with AQE setting (block-wise)")
            a = cfg.TEST.AQE
            qf, gf = aqe_chunked(qf, gf, a.QE_TIME, a.QE_K, a.ALPHA)

        kwargs = dict(
            max_rank=self.max_rank,
            query_block=c.QUERY_BLOCK,
            memory_budget_mb=c.MEMORY_BUDGET_MB,
            use_metric_cuhk03=c.USE_METRIC_CUHK03,
            num_threads=c.NUM_THREADS,
        )
        dist = None
        if cfg.TEST.RERANK.ENABLED:
            from fastreid.utils.compute_dist import build_dist

            r = cfg.TEST.RERANK
            need = check_rerank_memory(len(qf), len(gf), r.MEMORY_BUDGET_GB)
            logger.info("Test with rerank setting (full matrices, about %.2f GiB)", need)
            dist = build_dist(qf, gf, metric)
            dist = rerank_distance(qf, gf, dist, metric, r.K1, r.K2, r.LAMBDA)
            res = rank_distmat(dist, q_pids, g_pids, q_camids, g_camids, **kwargs)
        else:
            res = rank_features(
                qf, gf, q_pids, g_pids, q_camids, g_camids, metric, device=self.device, **kwargs
            )
        self.last_result = res
        logger.info(
            "ChunkedReidEvaluator: %d queries x %d gallery (%s) in %.2f s; %d valid, "
            "%d skipped (no valid match)",
            len(qf),
            len(gf),
            metric,
            time.perf_counter() - tic,
            res.num_valid,
            res.num_skipped,
        )

        results = OrderedDict()
        cmc = res.cmc
        mAP = res.mAP
        for r in self.ranks:
            results[f"Rank-{r}"] = cmc[r - 1] * 100
        results["mAP"] = mAP * 100
        results["mINP"] = res.mINP * 100
        results["metric"] = (mAP + cmc[0]) / 2 * 100

        if cfg.TEST.ROC.ENABLED:
            from fastreid.evaluation.roc import evaluate_roc
            from fastreid.utils.compute_dist import build_dist
            from sklearn import metrics

            key = "TEST.ROC.MEMORY_BUDGET_GB"
            budget = cfg.TEST.ROC.MEMORY_BUDGET_GB
            check_full_matrix_memory(len(qf), len(gf), budget, "TEST.ROC.ENABLED", key)
            if dist is None:
                dist = build_dist(qf, gf, metric)
            scores, labels = evaluate_roc(dist, q_pids, g_pids, q_camids, g_camids)
            fprs, tprs, _ = metrics.roc_curve(labels, scores)
            for fpr in [1e-4, 1e-3, 1e-2]:
                ind = np.argmin(np.abs(fprs - fpr))
                results[f"TPR@FPR={fpr:.0e}"] = tprs[ind]
        return copy.deepcopy(results)


#: ``TEST.EVALUATOR`` name -> class.
EVALUATORS = {"ChunkedReidEvaluator": ChunkedReidEvaluator}


#: Galleries smaller than this are evaluated with :class:`ChunkedReidEvaluator` when
#: ``TEST.EVALUATOR`` is fast-reid's ``ReidEvaluator`` (which needs 10 for Rank-10).
SMALL_GALLERY = 10


def build_reid_evaluator(cfg, num_query, num_gallery=None, output_dir=None):
    """The evaluator named by ``TEST.EVALUATOR``.

    With ``TEST.RERANK.ENABLED`` and a known gallery size the re-ranking memory is checked
    first, for fast-reid's evaluator too.

    Args:
        cfg (CfgNode)
        num_query (int): Q.
        num_gallery (int | None): G, for the re-ranking memory check.
        output_dir (str | None)
    Returns:
        DatasetEvaluator: ``ReidEvaluator`` or ``ChunkedReidEvaluator``.
    Raises:
        ValueError: unknown ``TEST.EVALUATOR``.
        RerankMemoryError: re-ranking over ``TEST.RERANK.MEMORY_BUDGET_GB``.
    """
    from fastreid.evaluation import ReidEvaluator

    name = cfg.TEST.get("EVALUATOR", "ReidEvaluator")
    classes = {"ReidEvaluator": ReidEvaluator, **EVALUATORS}
    if name not in classes:
        raise ValueError(f"TEST.EVALUATOR '{name}' is unknown; choose one of {sorted(classes)}")
    if cfg.TEST.RERANK.ENABLED and num_gallery is not None:
        budget = cfg.TEST.RERANK.get("MEMORY_BUDGET_GB", 0)
        check_rerank_memory(num_query, num_gallery, budget)
    if name == "ReidEvaluator" and num_gallery is not None and num_gallery < SMALL_GALLERY:
        # fast-reid's ReidEvaluator reads cmc[4] and cmc[9] (Rank-5/10) from a CMC cut at the
        # gallery size: an IndexError below 10 images. The chunked evaluator computes the same
        # metrics and holds the CMC flat past the gallery size.
        logger.info(
            "gallery of %d images (< %d): evaluating with ChunkedReidEvaluator, whose CMC is "
            "flat past the gallery size (fast-reid's ReidEvaluator cannot report Rank-5/10)",
            num_gallery,
            SMALL_GALLERY,
        )
        name = "ChunkedReidEvaluator"
    return classes[name](cfg, num_query, output_dir)
