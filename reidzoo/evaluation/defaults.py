"""Config keys of reidzoo's evaluation package (``TEST.EVALUATOR``, ``TEST.CHUNKED.*``, ...)."""

from reidzoo.config import add_node, register_config

#: Evaluators ``TEST.EVALUATOR`` may name.
EVALUATOR_NAMES = ("ReidEvaluator", "ChunkedReidEvaluator")


@register_config
def add_evaluation_config(cfg):
    """Add the evaluation keys; never overwrites a key that exists.

    * ``TEST.EVALUATOR``: ``"ReidEvaluator"`` (fast-reid's, the default) or
      ``"ChunkedReidEvaluator"`` (memory-bounded, same numbers).
    * ``TEST.CHUNKED.*``: the chunked evaluator's block size, memory budget and ranks.
    * ``TEST.RERANK.MEMORY_BUDGET_GB``: k-reciprocal re-ranking is refused, with the estimated
      memory in the error, above this budget (both evaluators).
    * ``TEST.ROC.MEMORY_BUDGET_GB``: the same for the ROC curve in the chunked evaluator (it
      needs the full distance matrix).

    Args:
        cfg (CfgNode): root config, modified in place.
    """
    add_node(cfg, "TEST", {"EVALUATOR": "ReidEvaluator"})
    add_node(
        cfg,
        "TEST.CHUNKED",
        {
            # Query rows per distance block; 0 derives it from MEMORY_BUDGET_MB. Blocks are
            # never smaller than 32 rows (see reidzoo.evaluation.chunked.MIN_BLOCK).
            "QUERY_BLOCK": 0,
            # Working memory for one block (distances, sort indices, masks), in MiB.
            "MEMORY_BUDGET_MB": 512,
            # Length of the CMC curve that is computed.
            "MAX_RANK": 50,
            # CMC ranks reported as "Rank-k" (each <= MAX_RANK).
            "RANKS": [1, 5, 10],
            # CUHK03 single-gallery-shot CMC (fast-reid's eval_cuhk03, 10 random draws).
            "USE_METRIC_CUHK03": False,
            # Device for the distance blocks: "" follows MODEL.DEVICE. On CUDA the distances
            # and the sort run on the GPU (equal to fast-reid's CPU numbers up to rounding).
            "DEVICE": "",
            # Threads sorting distance rows on the CPU; 0 uses torch.get_num_threads().
            "NUM_THREADS": 0,
        },
    )
    add_node(cfg, "TEST.RERANK", {"MEMORY_BUDGET_GB": 8.0})
    add_node(cfg, "TEST.ROC", {"MEMORY_BUDGET_GB": 8.0})
