"""fast-reid's k-reciprocal re-ranking behind a memory check.

``fastreid.utils.compute_dist.compute_jaccard_distance`` works on all ``N = num_query +
num_gallery`` features at once and keeps two dense ``[N, N]`` float32 matrices alive at its peak
(``V`` with its query-expanded copy, then ``V`` with the Jaccard distances): 66 GiB at MSMT17
size. :func:`check_rerank_memory` turns that into an error that names the estimate before
anything is allocated.
"""

import logging

import torch.nn.functional as F

logger = logging.getLogger(__name__)

GIB = 1024**3


class RerankMemoryError(MemoryError):
    """Re-ranking (or another full-matrix step) would exceed its configured memory budget."""


def estimate_rerank_bytes(num_query, num_gallery, dtype_bytes=4):
    """Peak memory of fast-reid's k-reciprocal re-ranking, in bytes.

    Two ``[N, N]`` matrices (``N = num_query + num_gallery``) plus three ``[num_query,
    num_gallery]`` ones (the original distances, the Jaccard block and their blend).

    Args:
        num_query (int): Q.
        num_gallery (int): G.
        dtype_bytes (int): bytes per element (4 for float32).
    Returns:
        int
    """
    n = int(num_query) + int(num_gallery)
    return 2 * n * n * dtype_bytes + 3 * int(num_query) * int(num_gallery) * dtype_bytes


def check_rerank_memory(num_query, num_gallery, budget_gb, dtype_bytes=4):
    """Raise before re-ranking when its estimated memory exceeds ``budget_gb``.

    Args:
        num_query (int): Q.
        num_gallery (int): G.
        budget_gb (float): budget in GiB (``TEST.RERANK.MEMORY_BUDGET_GB``); <= 0 disables.
        dtype_bytes (int): bytes per element.
    Returns:
        float: the estimate in GiB.
    Raises:
        RerankMemoryError: with the estimate, the budget and what to do.
    """
    need = estimate_rerank_bytes(num_query, num_gallery, dtype_bytes) / GIB
    if budget_gb > 0 and need > budget_gb:
        n = num_query + num_gallery
        raise RerankMemoryError(
            f"TEST.RERANK.ENABLED: k-reciprocal re-ranking of {num_query} queries + "
            f"{num_gallery} gallery images needs an estimated {need:.1f} GiB (two dense "
            f"{n} x {n} float32 matrices), over TEST.RERANK.MEMORY_BUDGET_GB={budget_gb:g}; "
            "disable re-ranking, evaluate a smaller gallery, or raise the budget if the "
            "machine has the memory"
        )
    return need


def check_full_matrix_memory(num_query, num_gallery, budget_gb, what, key, bytes_per_cell=32):
    """Raise when a step that needs the full ``[Q, G]`` distance matrix would not fit.

    Args:
        num_query (int): Q.
        num_gallery (int): G.
        budget_gb (float): budget in GiB; <= 0 disables the check.
        what (str): the step, for the message (e.g. ``"the ROC curve"``).
        key (str): the config key holding the budget.
        bytes_per_cell (int): bytes the step needs per query-gallery pair.
    Returns:
        float: the estimate in GiB.
    Raises:
        RerankMemoryError
    """
    need = int(num_query) * int(num_gallery) * bytes_per_cell / GIB
    if budget_gb > 0 and need > budget_gb:
        raise RerankMemoryError(
            f"{what} needs the full {num_query} x {num_gallery} distance matrix: an estimated "
            f"{need:.1f} GiB, over {key}={budget_gb:g}; turn it off or raise the budget"
        )
    return need


def rerank_distance(query_features, gallery_features, dist, metric, k1, k2, lambda_value):
    """fast-reid's re-ranked distance, exactly as ``ReidEvaluator`` computes it.

    Args:
        query_features (Tensor): [Q, D] float32, CPU.
        gallery_features (Tensor): [G, D] float32, CPU.
        dist (np.ndarray): [Q, G] float32, ``build_dist(query, gallery, metric)``.
        metric (str): ``"cosine"`` or ``"euclidean"`` (cosine normalises first, as fast-reid).
        k1 (int): ``TEST.RERANK.K1``.
        k2 (int): ``TEST.RERANK.K2``.
        lambda_value (float): ``TEST.RERANK.LAMBDA``, weight of the original distance.
    Returns:
        np.ndarray: [Q, G] float32.
    """
    from fastreid.utils.compute_dist import build_dist

    if metric == "cosine":
        query_features = F.normalize(query_features, dim=1)
        gallery_features = F.normalize(gallery_features, dim=1)
    rerank_dist = build_dist(query_features, gallery_features, metric="jaccard", k1=k1, k2=k2)
    return rerank_dist * (1 - lambda_value) + dist * lambda_value
