"""The evaluated turns of benchmarks/rag.py and the corpus it searches (full or pooled)."""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from _conversational import tasks
from _conversational.pool import pooled_corpus

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
    passages, tag = pooled_corpus(full, turns, judged, args.pool, Path(args.out) / "pools")
    return passages, {**info, "passages": len(passages), "tag": tag, "depth": args.pool}
