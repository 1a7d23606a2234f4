"""The evaluated turns of benchmarks/rag.py and the corpus it searches (full or pooled)."""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from _conversational import tasks

from chatretriever.io.files import atomic_write
from chatretriever.io.mtrag import iter_mtrag_corpus
from chatretriever.types import Passage, Session


def select_turns(
    sessions: Sequence[Session], conversations: set[str] | None, limit: int = 0
) -> list[Session]:
    """The evaluated turns: of the given conversations (None: all), with a reference response,
    sorted by id; `limit` > 0 keeps a sample of that many, the turns whose ids hash lowest
    (sha1), so that a small run spreads over many conversations and domains instead of taking
    the first few conversations whole, and a larger limit keeps every turn of a smaller one."""
    kept = [
        s
        for s in sessions
        if s.response and (conversations is None or tasks.conversation_of(s.id) in conversations)
    ]
    if limit:
        kept = sorted(kept, key=lambda s: hashlib.sha1(s.id.encode("utf-8")).hexdigest())[:limit]
    return sorted(kept, key=lambda s: s.id)


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
    return hashlib.sha1("\n".join(sorted(ids)).encode("utf-8")).hexdigest()


def load_corpus(
    args: argparse.Namespace, corpus_path: Path, turns: Sequence[Session], judged: Mapping
) -> tuple[list[Passage], dict[str, Any]]:
    """The searched passages (full or pooled, in corpus order) and how they were chosen.

    A pool's ids are cached in OUT/pools/ under the turns and the depth (no BM25 on a rerun).
    """
    full = list(iter_mtrag_corpus(corpus_path))
    info: dict[str, Any] = {"pooled": bool(args.pool), "full_passages": len(full), "tag": "full"}
    if not args.pool:
        return full, {**info, "passages": len(full)}
    cache = Path(args.out) / "pools" / f"pool{args.pool}.{ids_sha(s.id for s in turns)[:12]}.txt"
    if cache.exists():
        ids = set(cache.read_text(encoding="utf-8").split())
    else:
        from chatretriever.retrieval.baselines import BM25Retriever

        print(f"pooling: BM25 top {args.pool} of {len(turns)} turns over {len(full):,} passages")
        run = BM25Retriever(full, show_progress=True).search(turns, args.pool, "last_turn")
        hits = {q: [d.doc_id for d in run.ranked(q)] for q in run.scores}
        ids = pool_ids(judged, hits, args.pool)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache) as f:
            f.write("".join(f"{i}\n" for i in sorted(ids)))
    passages = [p for p in full if p.id in ids]
    tag = f"pool{args.pool}-{ids_sha(ids)[:8]}"
    return passages, {**info, "passages": len(passages), "tag": tag, "depth": args.pool}
