"""Top k with ties broken the same way everywhere: the dense backends (Faiss, Milvus) search
past k while the score at the cut is tied, then cut by (-score, id), as every run file is
ordered. Torch-free."""

from __future__ import annotations

import logging
from collections.abc import Callable

from chatretriever.types import rank_key

logger = logging.getLogger(__name__)


TIE_MARGIN = 8  # hits fetched past k, to see whether the score at the cut is tied
TIE_LIMIT = 1024  # at most this many hits past k are fetched to settle a tie


def top_k_with_ties(
    search_at: Callable[[int, list[int]], list[list[tuple[str, float]]]],
    k: int,
    total: int,
    n_queries: int,
) -> list[list[tuple[str, float]]]:
    """Each query's top k, ties broken by (-score, id) as in every run file, at the cut too.

    An index returns tied passages (duplicates under several ids) in an order of its own, so
    which of them make the cut would depend on the backend and on k. `search_at(depth, rows)`
    (the hits of those query rows) is asked past k, again only for the queries whose score
    after the cut equals the k-th, until it differs, the index is spent or `TIE_LIMIT` hits
    past k were fetched (then the tie is broken among those, with a warning).
    """
    k = min(k, total)
    if k < 1:
        raise ValueError(f"k must be at least 1 (and the index not empty), got k={k}")
    limit = min(total, k + TIE_LIMIT)
    depth, rows = min(k + TIE_MARGIN, total), list(range(n_queries))
    hits: list[list[tuple[str, float]]] = [[] for _ in rows]
    while rows:
        for row, h in zip(rows, search_at(depth, rows), strict=True):
            hits[row] = h
        rows = [r for r in rows if len(hits[r]) == depth and hits[r][-1][1] == hits[r][k - 1][1]]
        if rows and depth >= limit:
            if depth < total:
                logger.warning(
                    "%d queries have more than %d passages tied at rank %d: the tie is broken "
                    "by id among those fetched",
                    len(rows),
                    TIE_LIMIT,
                    k,
                )
            break
        depth = min(2 * depth, limit)
    short = [len(h) for h in hits if len(h) < k]
    if short:  # an exact index always fills k; an approximate one may search too little
        logger.warning(
            "%d of %d queries got fewer than k=%d hits (as few as %d) from an index of %d "
            "vectors: an approximate index searched too little of it (IVF: raise nprobe with "
            "--params)",
            len(short),
            n_queries,
            k,
            min(short),
            total,
        )
    return [sorted(h, key=lambda p: rank_key(*p))[:k] for h in hits]
