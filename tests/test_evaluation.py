"""The chunked evaluator returns fast-reid's numbers exactly, with bounded memory."""

import logging

import numpy as np
import pytest
import torch
from fastreid.evaluation import ReidEvaluator, inference_on_dataset
from fastreid.evaluation.query_expansion import aqe
from fastreid.evaluation.rank import eval_cuhk03, eval_market1501, evaluate_rank
from fastreid.utils.compute_dist import build_dist

from reidzoo.config import get_cfg
from reidzoo.evaluation import (
    MIN_BLOCK,
    ChunkedReidEvaluator,
    DistanceBlocks,
    RerankMemoryError,
    aqe_chunked,
    build_reid_evaluator,
    check_rerank_memory,
    estimate_rerank_bytes,
    plan_query_blocks,
    rank_distmat,
    rank_features,
)
from reidzoo.evaluation import chunked as chunked_mod
from tests.helpers import cpu_cfg, tiny_cfg

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _ids(rng, nq, ng, num_ids=40, cams=4):
    """Random identities/cameras [Q], [G], [Q], [G] with some queries left without a match."""
    q_pids = rng.integers(0, num_ids, nq)
    g_pids = rng.integers(0, num_ids, ng)
    q_camids = rng.integers(0, cams, nq)
    g_camids = rng.integers(0, cams, ng)
    g_pids[g_pids == 0] = 1  # identity 0 never in the gallery: those queries are skipped
    q_pids[:3] = 0
    return q_pids, g_pids, q_camids, g_camids


def _stock(dist, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """fast-reid's numpy ranking (what ReidEvaluator runs without the Cython build)."""
    cmc, all_ap, all_inp = eval_market1501(dist, q_pids, g_pids, q_camids, g_camids, max_rank)
    return cmc, np.asarray(all_ap), np.asarray(all_inp)


def _assert_same(res, cmc, all_ap, all_inp, num_query):
    assert res.cmc.shape == cmc.shape
    np.testing.assert_allclose(res.cmc, cmc, rtol=0, atol=1e-6)
    np.testing.assert_allclose(res.all_AP, all_ap, rtol=0, atol=1e-6)
    np.testing.assert_allclose(res.all_INP, all_inp, rtol=0, atol=1e-6)
    assert abs(res.mAP - np.mean(all_ap)) < 1e-6
    assert abs(res.mINP - np.mean(all_inp)) < 1e-6
    assert res.num_valid == len(all_ap)
    assert res.num_skipped == num_query - len(all_ap)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("block", [32, 40, 1000])
def test_random_features_demo_size(metric, block):
    """Demo size (96 queries x 480 gallery), 2048-d, several block sizes."""
    rng = np.random.default_rng(1)
    torch.manual_seed(1)
    qf, gf = torch.randn(96, 2048), torch.randn(480, 2048)
    ids = _ids(rng, 96, 480)
    # fast-reid's ranking of the very distances the blocks give (equal to build_dist's matrix
    # to rounding, bit for bit where sgemm does not round by row count: see the next test)
    src = DistanceBlocks(qf, gf, metric)
    blocks = [src.block(a, b).numpy() for a, b in plan_query_blocks(96, 480, query_block=block)]
    ref = _stock(np.concatenate(blocks), *ids)
    res = rank_features(qf, gf, *ids, metric=metric, query_block=block)
    _assert_same(res, *ref, num_query=96)
    assert res.num_skipped >= 3
    assert res.num_sorted_rows < 96 - 3  # most rows are counted, not sorted


@pytest.mark.parametrize("dim", [256, 2048])
def test_distance_blocks_match_fastreid_to_rounding(dim):
    """Row blocks of >= MIN_BLOCK rows reproduce build_dist's full matrix to within 4 ulp of its
    entries. (They were bit for bit on the AMD EPYC AVX2 VMs; on an Intel Xeon with AVX-512,
    sgemm rounds by row count and 2048-d blocks differ by 2 ulp, so bits are not asserted.)"""
    torch.manual_seed(0)
    qf, gf = torch.randn(203, dim), torch.randn(700, dim)
    for metric in ("cosine", "euclidean"):
        full = build_dist(qf, gf, metric)
        src = DistanceBlocks(qf, gf, metric)
        # cosine distances near 0 or 1 still carry the rounding of the dot product (~ 1)
        scale = np.maximum(np.abs(full), 1.0)
        for start, stop in plan_query_blocks(203, 700, query_block=MIN_BLOCK):
            err = np.abs(src.block(start, stop).numpy() - full[start:stop])
            assert (err <= 4 * np.spacing(scale[start:stop].astype(np.float32))).all(), (
                metric,
                start,
                float(err.max()),
            )


def test_plan_query_blocks_bounds():
    assert plan_query_blocks(0, 10) == []
    assert plan_query_blocks(5, 10, query_block=64) == [(0, 5)]
    blocks = plan_query_blocks(1000, 15913, query_block=300)
    assert blocks[0][0] == 0 and blocks[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    sizes = [b - a for a, b in blocks]
    assert max(sizes) <= 300 and min(sizes) >= MIN_BLOCK // 2
    # user blocks below MIN_BLOCK are raised (MKL rounds small row blocks differently)
    assert min(b - a for a, b in plan_query_blocks(100, 10, query_block=3)) >= MIN_BLOCK // 2
    # from the memory budget: 24 bytes per pair
    rows = 512 * 2**20 // (24 * 82161)
    (a, b), *_ = plan_query_blocks(10**6, 82161, memory_budget_mb=512)
    assert rows - 1 <= b - a <= rows


def test_ties_follow_fastreid_order():
    """Binary features give many exactly equal distances between matches and non-matches;
    the tie order of np.argsort's default kind decides AP, and ours is fast-reid's."""
    rng = np.random.default_rng(3)
    qf = torch.from_numpy(rng.integers(0, 2, (96, 6))).float()
    gf = torch.from_numpy(rng.integers(0, 2, (480, 6))).float()
    ids = _ids(rng, 96, 480, num_ids=12, cams=3)
    q_pids, g_pids = ids[0], ids[1]
    for metric in ("euclidean", "cosine"):
        dist = build_dist(qf, gf, metric)
        # the test is meaningful: a match and a non-match share a distance in most rows
        cross = [
            np.intersect1d(dist[i][g_pids == q_pids[i]], dist[i][g_pids != q_pids[i]]).size > 0
            for i in range(96)
        ]
        assert np.mean(cross) > 0.5
        ref = _stock(dist, *ids)
        res = rank_features(qf, gf, *ids, metric=metric, query_block=32)
        _assert_same(res, *ref, 96)
        assert res.num_sorted_rows > 40  # the tied rows went through np.argsort
        _assert_same(rank_distmat(dist, *ids, query_block=40), *ref, 96)
    # and the order matters: a stable sort of the same distances gives another mAP
    stable = chunked_mod._Ranker(ids[0], ids[2], ids[1], ids[3], 50, False)
    stable.add_order(0, np.argsort(dist, axis=1, kind="stable"))
    assert abs(stable.result().mAP - np.mean(ref[1])) > 1e-4


def test_nan_zero_and_duplicate_distances():
    """NaN distances (sorted last by np.argsort), +0.0 / -0.0 and repeated values."""
    rng = np.random.default_rng(5)
    ids = _ids(rng, 64, 300, num_ids=10)
    dist = rng.integers(0, 50, (64, 300)).astype(np.float32) / 7
    dist[rng.random((64, 300)) < 0.05] = np.nan
    dist[rng.random((64, 300)) < 0.02] = -0.0  # equal to 0.0, other bits
    ref = _stock(dist, *ids)
    _assert_same(rank_distmat(dist, *ids), *ref, 64)
    _assert_same(rank_distmat(dist.astype(np.float64), *ids), *ref, 64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_counting_equals_sorting(dtype):
    """The counting path gives the statistics of np.argsort's order, row by row."""
    rng = np.random.default_rng(11)
    q_pids, g_pids, q_camids, g_camids = _ids(rng, 150, 700, num_ids=25)
    dist = np.concatenate(
        [rng.random((75, 700)), rng.integers(0, 30, (75, 700)) / 9.0]  # distinct, then tied
    ).astype(dtype)
    order = np.argsort(dist, axis=1)
    ref = chunked_mod._stats_from_order(order, q_pids, q_camids, g_pids, g_camids)
    got = chunked_mod._stats_by_counting(dist, q_pids, q_camids, g_pids, g_camids)
    assert np.array_equal(got.n_rel, ref.n_rel) and np.array_equal(got.first, ref.first)
    np.testing.assert_allclose(got.ap, ref.ap, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got.inp, ref.inp, rtol=0, atol=1e-12)
    assert 0 < got.sorted_rows < 150


@pytest.mark.parametrize("seed", [0, 7])
def test_cuhk03_single_gallery_shot(seed):
    """Same draws from np.random as fast-reid's eval_cuhk03: equal CMC, mAP and RNG state."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    qf, gf = torch.randn(96, 128), torch.randn(480, 128)
    ids = _ids(rng, 96, 480, num_ids=100)
    dist = build_dist(qf, gf, "cosine")
    np.random.seed(seed)
    cmc, mAP = eval_cuhk03(dist, *ids, 50)
    after_stock = np.random.get_state()
    np.random.seed(seed)
    res = rank_features(qf, gf, *ids, metric="cosine", query_block=32, use_metric_cuhk03=True)
    after_ours = np.random.get_state()
    assert np.array_equal(res.cmc[: len(cmc)], cmc)
    assert abs(res.mAP - mAP) < 1e-12
    assert after_stock[2] == after_ours[2] and np.array_equal(after_stock[1], after_ours[1])
    # and through compat's evaluate_rank (which pads the curve to max_rank)
    np.random.seed(seed)
    padded, _ = evaluate_rank(dist, *ids, max_rank=50, use_metric_cuhk03=True)
    np.testing.assert_array_equal(res.cmc, padded)


def test_small_gallery_cmc_padded_like_compat():
    rng = np.random.default_rng(0)
    qf, gf = torch.randn(6, 16), torch.randn(8, 16)
    q_pids, g_pids = np.arange(6) % 4, np.arange(8) % 4
    q_cams, g_cams = np.zeros(6, int), np.ones(8, int) + rng.integers(0, 2, 8)
    dist = build_dist(qf, gf, "cosine")
    cmc, all_ap, all_inp = evaluate_rank(dist, q_pids, g_pids, q_cams, g_cams, use_cython=False)
    assert len(cmc) == 8  # fast-reid's CMC stops at the gallery size ...
    cmc = np.concatenate([cmc, np.full(42, cmc[-1], cmc.dtype)])  # ... and is flat after it
    res = rank_features(qf, gf, q_pids, g_pids, q_cams, g_cams)
    _assert_same(res, cmc, np.asarray(all_ap), np.asarray(all_inp), 6)


def test_skipped_queries_counted_and_all_skipped_is_an_error():
    qf, gf = torch.randn(4, 8), torch.randn(6, 8)
    g_pids, g_cams = np.array([1, 1, 2, 2, 3, 3]), np.array([0, 1, 0, 1, 0, 1])
    q_pids, q_cams = np.array([1, 2, 9, 3]), np.array([0, 0, 0, 0])
    res = rank_features(qf, gf, q_pids, g_pids, q_cams, g_cams)
    assert (res.num_valid, res.num_skipped) == (3, 1)
    assert res.valid.tolist() == [True, True, False, True]
    with pytest.raises(ValueError, match="none of the 2 queries"):
        rank_features(qf[:2], gf[:2], np.array([1, 9]), g_pids[:2], q_cams[:2], np.zeros(2, int))


def test_block_memory_is_bounded(monkeypatch):
    """Distances are only ever materialised as [block, G]."""
    shapes = []
    orig = DistanceBlocks.block

    def spy(self, start, stop):
        out = orig(self, start, stop)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(DistanceBlocks, "block", spy)
    qf, gf = torch.randn(200, 32), torch.randn(300, 32)
    ids = _ids(np.random.default_rng(0), 200, 300)
    # budget of 0.5 MiB: 0.5 * 2**20 / (24 * 300) = 72 rows per block
    rank_features(qf, gf, *ids, memory_budget_mb=0.5)
    assert len(shapes) == 3 and max(s[0] for s in shapes) <= 72
    assert all(s[1] == 300 for s in shapes)


# ------------------------------------------------------------------------------------------
# the evaluator
# ------------------------------------------------------------------------------------------
def _cfg(**overrides):
    return cpu_cfg(**{"TEST.EVALUATOR": "ChunkedReidEvaluator", **overrides})


def _feed(evaluators, feats, pids, camids, batch=50):
    for ev in evaluators:
        ev.reset()
    for a in range(0, len(feats), batch):
        inputs = {
            "targets": torch.from_numpy(pids[a : a + batch]),
            "camids": torch.from_numpy(camids[a : a + batch]),
        }
        for ev in evaluators:
            ev.process(inputs, feats[a : a + batch])


def _compare_with_reid_evaluator(cfg, nq=96, ng=480, dim=256, seed=0):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    q_pids, g_pids, q_cams, g_cams = _ids(rng, nq, ng)
    feats = torch.randn(nq + ng, dim)
    pids, cams = np.concatenate([q_pids, g_pids]), np.concatenate([q_cams, g_cams])
    stock, ours = ReidEvaluator(cfg, nq), ChunkedReidEvaluator(cfg, nq)
    _feed([stock, ours], feats, pids, cams)
    expected, got = stock.evaluate(), ours.evaluate()
    assert list(got) == list(expected)
    for k in expected:
        assert abs(float(got[k]) - float(expected[k])) < 1e-6, (k, got[k], expected[k])
    assert type(got["Rank-1"]) is type(expected["Rank-1"])
    # evaluate() can run again on the same predictions
    again = ours.evaluate()
    assert all(float(again[k]) == float(got[k]) for k in got)
    return ours


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_evaluator_equals_reid_evaluator(metric, caplog):
    with caplog.at_level(logging.INFO, logger="reidzoo.evaluation.chunked"):
        ours = _compare_with_reid_evaluator(
            _cfg(**{"TEST.METRIC": metric, "TEST.CHUNKED.QUERY_BLOCK": 32})
        )
    assert ours.last_result.num_skipped >= 3
    assert f"{ours.last_result.num_skipped} skipped" in caplog.text


def test_evaluator_with_aqe_and_roc_equals_reid_evaluator():
    _compare_with_reid_evaluator(
        _cfg(**{"TEST.AQE.ENABLED": True, "TEST.ROC.ENABLED": True}), nq=40, ng=160, dim=32
    )


def test_aqe_chunked_equals_fastreid():
    torch.manual_seed(0)
    qf, gf = torch.randn(50, 32), torch.randn(150, 32)
    ref_q, ref_g = aqe(qf, gf, 2, 5, 3.0)
    q, g = aqe_chunked(qf, gf, 2, 5, 3.0, block=MIN_BLOCK)
    assert torch.equal(q, ref_q) and torch.equal(g, ref_g)


def test_evaluator_with_rerank_equals_reid_evaluator():
    _compare_with_reid_evaluator(
        _cfg(**{"TEST.RERANK.ENABLED": True, "TEST.RERANK.K1": 6, "TEST.RERANK.K2": 3}),
        nq=20,
        ng=60,
        dim=16,
    )


def test_extra_ranks():
    cfg = _cfg(**{"TEST.CHUNKED.RANKS": [1, 20, 100], "TEST.CHUNKED.MAX_RANK": 50})
    rng = np.random.default_rng(0)
    q_pids, g_pids, q_cams, g_cams = _ids(rng, 30, 200)
    feats = torch.randn(230, 16)
    ev = ChunkedReidEvaluator(cfg, 30)
    _feed([ev], feats, np.concatenate([q_pids, g_pids]), np.concatenate([q_cams, g_cams]))
    out = ev.evaluate()
    assert list(out)[:3] == ["Rank-1", "Rank-20", "Rank-100"]
    assert len(ev.last_result.cmc) == 100
    dist = build_dist(feats[:30], feats[30:], "cosine")
    cmc, _, _ = eval_market1501(dist, q_pids, g_pids, q_cams, g_cams, 100)
    for r in (1, 20, 100):
        assert out[f"Rank-{r}"] == cmc[r - 1] * 100


def test_rerank_memory_error_names_the_estimate():
    with pytest.raises(RerankMemoryError, match=r"76\.3 GiB.*93820 x 93820.*MEMORY_BUDGET_GB=8"):
        check_rerank_memory(11659, 82161, 8.0)
    assert check_rerank_memory(3368, 15913, 8.0) == pytest.approx(
        estimate_rerank_bytes(3368, 15913) / 2**30
    )
    assert check_rerank_memory(11659, 82161, 0) > 76  # 0 disables the check
    cfg = _cfg(**{"TEST.RERANK.ENABLED": True})
    for name in ("ReidEvaluator", "ChunkedReidEvaluator"):
        cfg.TEST.EVALUATOR = name
        with pytest.raises(RerankMemoryError, match="GiB"):
            build_reid_evaluator(cfg, 11659, 82161)
    # the chunked evaluator checks again at evaluate() time, before any N x N allocation
    cfg.TEST.RERANK.MEMORY_BUDGET_GB = 1e-6
    ev = ChunkedReidEvaluator(cfg, 10)
    _feed([ev], torch.randn(30, 8), np.arange(30) % 5, np.arange(30) % 2)
    with pytest.raises(RerankMemoryError, match="10 queries \\+ 20 gallery"):
        ev.evaluate()


def test_config_keys_and_unknown_evaluator():
    cfg = get_cfg()
    assert cfg.TEST.EVALUATOR == "ReidEvaluator"
    c = cfg.TEST.CHUNKED
    assert (c.QUERY_BLOCK, c.MEMORY_BUDGET_MB, c.MAX_RANK) == (0, 512, 50)
    assert list(c.RANKS) == [1, 5, 10] and c.USE_METRIC_CUHK03 is False
    assert cfg.TEST.RERANK.MEMORY_BUDGET_GB == 8.0 and cfg.TEST.ROC.MEMORY_BUDGET_GB == 8.0
    assert isinstance(build_reid_evaluator(cfg, 3), ReidEvaluator)
    cfg.TEST.EVALUATOR = "Nope"
    with pytest.raises(ValueError, match="ChunkedReidEvaluator"):
        build_reid_evaluator(cfg, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_blocks_close_to_cpu():  # pragma: no cover - GPU machines only
    rng = np.random.default_rng(0)
    qf, gf = torch.randn(96, 256), torch.randn(480, 256)
    ids = _ids(rng, 96, 480)
    cpu = rank_features(qf, gf, *ids)
    gpu = rank_features(qf, gf, *ids, device="cuda")
    assert abs(cpu.mAP - gpu.mAP) < 1e-4 and np.abs(cpu.cmc - gpu.cmc).max() < 0.02


# ------------------------------------------------------------------------------------------
# through the trainer (what train_net.py and --eval-only run)
# ------------------------------------------------------------------------------------------
class _Tee:
    def __init__(self, *evaluators):
        self.evaluators = evaluators

    def reset(self):
        for e in self.evaluators:
            e.reset()

    def process(self, inputs, outputs):
        for e in self.evaluators:
            e.process(inputs, outputs)

    def evaluate(self):
        return [e.evaluate() for e in self.evaluators]


def test_trainer_builds_chunked_evaluator_with_reid_evaluator_numbers(tiny_market, tmp_path):
    from reidzoo.engine import ReidTrainer

    torch.manual_seed(0)
    cfg = tiny_cfg(tiny_market, str(tmp_path), **{"TEST.EVALUATOR": "ChunkedReidEvaluator"})
    loader, ours = ReidTrainer.build_evaluator(cfg, "Market1501")
    assert isinstance(ours, ChunkedReidEvaluator)
    stock_cfg = tiny_cfg(tiny_market, str(tmp_path))
    _, stock = ReidTrainer.build_evaluator(stock_cfg, "Market1501")
    assert type(stock) is ReidEvaluator

    model = ReidTrainer.build_model(cfg)
    got, expected = inference_on_dataset(model, loader, _Tee(ours, stock))
    assert list(got) == list(expected)
    for k in expected:
        assert abs(float(got[k]) - float(expected[k])) < 1e-6, k

    # ReidTrainer.test is what `train_net.py --eval-only` runs
    results = ReidTrainer.test(cfg, model)
    assert all(abs(float(results[k]) - float(expected[k])) < 1e-6 for k in expected)
