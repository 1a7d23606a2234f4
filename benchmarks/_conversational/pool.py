"""A pooled corpus (`--pool P` of benchmarks/conversational.py and benchmarks/rag.py): every
passage judged for the evaluated tasks plus BM25's top P of each on its last turn.

Searching a pool instead of the whole corpus makes a model's evaluation cost the pool's encoding
only (thousands of passages instead of 38,104); the numbers are then pooled numbers (fewer
distractors than the full corpus), comparable with each other, not with full-corpus rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from chatretriever.io.atomic import atomic_write
from chatretriever.types import Passage, Session


def pool_ids(
    judged: Mapping[str, Mapping[str, int]], bm25_hits: Mapping[str, Sequence[str]], depth: int
) -> set[str]:
    """A pooled corpus: every passage judged for the turns (any relevance, rel 0 included) and
    the top `depth` BM25 hits of each turn.

    Args:
        judged: Turn id -> doc id -> relevance (the evaluated turns only).
        bm25_hits: Turn id -> BM25's doc ids, best first.
        depth: BM25 hits kept per turn.

    Returns:
        The pooled passage ids.
    """
    pool = {d for docs in judged.values() for d in docs}
    pool.update(d for hits in bm25_hits.values() for d in hits[:depth])
    return pool


def ids_sha(ids: Iterable[str]) -> str:
    """sha1 of the sorted ids, one per line (names a set of turns or passages)."""
    return hashlib.sha1("\n".join(sorted(ids)).encode("utf-8")).hexdigest()


def pooled_corpus(
    full: Sequence[Passage],
    turns: Sequence[Session],
    judged: Mapping[str, Mapping[str, int]],
    depth: int,
    cache_dir: Path,
) -> tuple[list[Passage], str]:
    """The pool of `turns` (in corpus order) and its tag (`pool<depth>-<sha of its ids>`).

    The ids are cached in `cache_dir/pool<depth>.<sha of the turn ids>.txt`, so a rerun runs no
    BM25.
    """
    if depth < 1:
        raise ValueError(f"the pool depth must be at least 1, got {depth}")
    cache = cache_dir / f"pool{depth}.{ids_sha(s.id for s in turns)[:12]}.txt"
    if cache.exists():
        ids = set(cache.read_text(encoding="utf-8").split())
    else:
        from chatretriever.retrieval.bm25 import BM25Retriever

        print(f"pooling: BM25 top {depth} of {len(turns)} turns over {len(full):,} passages")
        run = BM25Retriever(list(full), show_progress=True).search(list(turns), depth, "last_turn")
        hits = {q: [d.doc_id for d in run.ranked(q)] for q in run.scores}
        ids = pool_ids(judged, hits, depth)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache) as f:
            f.write("".join(f"{i}\n" for i in sorted(ids)))
    return [p for p in full if p.id in ids], f"pool{depth}-{ids_sha(ids)[:8]}"
