"""The retrieval runs of benchmarks/rationale.py's quality part: dense (any encoder the registry
loads) and BM25 over a task's candidates, and their evaluation (run files written beside)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from _rationale.report import MEASURES
from chatretriever.retrieval.evaluate import evaluate_run
from chatretriever.retrieval.search import save_run
from chatretriever.types import Passage, Run, Session


def top_k_run(
    sims: np.ndarray, sessions: Sequence[Session], docs: Sequence[Passage], k: int, name: str
) -> Run:
    """The k best documents of each query of a (Q, N) score matrix."""
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    scores = {s.id: {docs[j].id: float(sims[i, j]) for j in top[i]} for i, s in enumerate(sessions)}
    return Run(scores, name)


def dense_run(
    model: str, sessions: Sequence[Session], docs: Sequence[Passage], k: int, name: str = ""
) -> Run:
    """Exact inner-product search with any encoder the registry loads (a built-in sentence
    embedder, a sentence-transformers dir, a trained ChatRetriever run dir)."""
    from chatretriever.apps.registry import load_encoder

    enc = load_encoder(model)
    q = enc.encode_sessions(sessions, batch_size=32)  # (Q, D)
    p = enc.encode_passages(docs, batch_size=64)  # (N, D)
    return top_k_run(q @ p.T, sessions, docs, k, name or model)  # (Q, N) similarities


def dense_runs(
    args: argparse.Namespace, sessions: Sequence[Session], docs: Sequence[Passage], k: int
) -> dict[str, Run]:
    """The dense rows: MiniLM, mpnet with --mpnet, each --dense NAME=DIR."""
    models = [("minilm-l6", "minilm-l6")] + [("mpnet-base", "mpnet-base")] * args.mpnet
    return {n: dense_run(m, sessions, docs, k, n) for n, m in [*models, *args.dense]}


def bm25_run(sessions: Sequence[Session], docs: Sequence[Passage], k: int) -> Run:
    from chatretriever.retrieval.bm25 import BM25Retriever

    return BM25Retriever(docs).search(sessions, k=k, formulation="full_history")


def subset_run(run: Run, ids: set[str]) -> Run:
    return Run({q: d for q, d in run.scores.items() if q in ids}, run.name)


def evaluate_all(
    runs: dict[str, Run], qrels: Any, out: Path, task: str, settings: dict[str, Any]
) -> dict[str, Any]:
    rows = {}
    for name, run in runs.items():
        save_run(out / f"{task}.{name}.run", run, {**settings, "system": name}, depth=100)
        ev = evaluate_run(run, qrels, MEASURES)
        rows[name] = {"queries": ev.num_queries, **ev.aggregate}
    return rows
