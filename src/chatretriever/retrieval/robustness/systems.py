"""Systems under test as `Retrieve` callables (sessions -> run): dense, BM25, rewrite, hybrid.

The robustness loops call a system many times on small batches of new sessions, so each
callable holds its loaded model and index and only searches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chatretriever.retrieval.encoders import Encoder
from chatretriever.retrieval.fusion import FusionConfig, fuse_runs
from chatretriever.retrieval.robustness.generation import RobustnessLLM
from chatretriever.retrieval.robustness.partial import Retrieve
from chatretriever.retrieval.search import Formulation, SessionSearcher, search_dense
from chatretriever.types import Run, Session, rank_key


def dense_system(
    encoder: Encoder,
    index: Any,
    formulation: Formulation | str = Formulation.SESSION,
    k: int = 100,
    batch_size: int = 16,
) -> Retrieve:
    """An encoder and its corpus index (`DenseIndex`, or anything with its `search`)."""

    def retrieve(sessions: Sequence[Session]) -> Run:
        return search_dense(
            encoder, index, sessions, k, formulation, batch_size, show_progress=False
        )

    return retrieve


def sparse_system(
    searcher: SessionSearcher, formulation: Formulation | str, k: int = 100
) -> Retrieve:
    """BM25 (`baselines.BM25Retriever`) under a query formulation."""

    def retrieve(sessions: Sequence[Session]) -> Run:
        return searcher.search(sessions, k, formulation)

    return retrieve


def rewrite_system(inner: Retrieve, llm: RobustnessLLM) -> Retrieve:
    """LLM4CS "REW": the LLM rewrites every last question (`RobustnessLLM.rewrite_sessions`:
    batched, through the LLM's cache), then `inner` searches the rewrites (a system on the
    "rewrite" form)."""

    def retrieve(sessions: Sequence[Session]) -> Run:
        plain = [Session(s.id, s.turns, None, s.response, s.metadata) for s in sessions]
        return inner(llm.rewrite_sessions(plain))

    return retrieve


def hybrid_system(
    dense: Retrieve, sparse: Retrieve, fusion: FusionConfig, k: int = 100
) -> Retrieve:
    """Two systems' runs fused (`fusion.fuse_runs`), cut to k per query."""

    def retrieve(sessions: Sequence[Session]) -> Run:
        fused = fuse_runs(dense(sessions), sparse(sessions), fusion)
        top = {
            q: dict(sorted(d.items(), key=lambda kv: rank_key(*kv))[:k])
            for q, d in fused.scores.items()
        }
        return Run(top, fused.name)

    return retrieve
