"""Evaluation and retrieval at scale.

* :class:`ChunkedReidEvaluator` (``TEST.EVALUATOR: ChunkedReidEvaluator``): fast-reid's CMC /
  mAP / mINP, exactly, with memory bounded by query blocks.
* :mod:`reidzoo.evaluation.retrieval`: gallery features written to disk in shards, faiss
  indexes (exact flat, IVF-Flat, IVF-PQ, HNSW) built from them, saved and loaded atomically,
  top-k search and recall@k against the exact index.
* :mod:`reidzoo.evaluation.rerank`: fast-reid's k-reciprocal re-ranking behind a memory check.
"""

from .chunked import (  # noqa: E402
    EVALUATORS,
    MIN_BLOCK,
    ChunkedReidEvaluator,
    DistanceBlocks,
    RankResult,
    aqe_chunked,
    build_reid_evaluator,
    plan_query_blocks,
    rank_distmat,
    rank_features,
)
from .defaults import EVALUATOR_NAMES, add_evaluation_config  # noqa: E402
from .rerank import (  # noqa: E402
    RerankMemoryError,
    check_rerank_memory,
    estimate_rerank_bytes,
    rerank_distance,
)
from .retrieval import (  # noqa: E402
    FeatureShardReader,
    FeatureShardWriter,
    GalleryIndex,
    extract_to_shards,
    recall_at_k,
)

__all__ = [
    "EVALUATORS",
    "EVALUATOR_NAMES",
    "MIN_BLOCK",
    "ChunkedReidEvaluator",
    "DistanceBlocks",
    "FeatureShardReader",
    "FeatureShardWriter",
    "GalleryIndex",
    "RankResult",
    "RerankMemoryError",
    "add_evaluation_config",
    "aqe_chunked",
    "build_reid_evaluator",
    "check_rerank_memory",
    "estimate_rerank_bytes",
    "extract_to_shards",
    "plan_query_blocks",
    "rank_distmat",
    "rank_features",
    "recall_at_k",
    "rerank_distance",
]
