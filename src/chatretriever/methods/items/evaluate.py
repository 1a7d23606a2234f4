"""Evaluate a retriever on the item tasks: masked rankings, Hit/precision/coverage@k, nDCG@10.

A ranker is any `RankFn`: (sessions, depth) -> per session its (item id, score) list, best
first. `dense_ranker` wraps any `Encoder` (items embedded once), `bm25_ranker` the shared BM25.
`rank_items` removes each query's masked items (`metadata.exclude`: the history for UH2I/UQ2I,
the source item for I2I) and keeps `depth` results; `evaluate_items` scores them per task:
hit@k for every task, precision@k for id tasks, constraint_coverage@k for attribute tasks, at
k = 1, 5, 10, 20, plus nDCG@10 through `retrieval.evaluate`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chatretriever.errors import DataFormatError
from chatretriever.methods.items.catalog import Constraint, item_metadata
from chatretriever.methods.items.metrics import (
    constraint_coverage_at_k,
    hit_at_k,
    precision_at_k,
)
from chatretriever.methods.items.templates import ATTRIBUTE_TASKS, TASKS
from chatretriever.retrieval.encoders import Encoder
from chatretriever.retrieval.evaluate import evaluate_run
from chatretriever.types import Passage, Run, Session, rank_key

logger = logging.getLogger(__name__)

KS = (1, 5, 10, 20)
RankFn = Callable[[Sequence[Session], int], list[list[tuple[str, float]]]]


def _as_rendered(items: Sequence[Passage]) -> list[Passage]:
    # The item text alone (it starts with "title: ..."): no second title line.
    return [Passage(id=p.id, text=p.text) for p in items]


def dense_ranker(
    encoder: Encoder, items: Sequence[Passage], batch_size: int = 64, show_progress: bool = False
) -> RankFn:
    """A ranker by inner product of `encoder`'s query and item embeddings.

    Args:
        encoder: Any `Encoder`.
        items: The catalog (text = the rendered item).
        batch_size: Encoding batch size.
        show_progress: Progress bars while encoding.
    """
    ids = [p.id for p in items]
    emb = encoder.encode_passages(_as_rendered(items), batch_size, show_progress)  # (N, D)

    def rank(sessions: Sequence[Session], depth: int) -> list[list[tuple[str, float]]]:
        q = encoder.encode_sessions(list(sessions), batch_size, show_progress)  # (Q, D)
        scores = q @ emb.T  # (Q, N)
        k = min(depth, len(ids))
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (Q, k), unordered
        return [
            sorted(((ids[j], float(row[j])) for j in cols), key=lambda x: rank_key(x[0], x[1]))
            for row, cols in zip(scores, top, strict=True)
        ]

    return rank


def bm25_ranker(items: Sequence[Passage]) -> RankFn:
    """A ranker by BM25 (the package's one BM25 setting) over the rendered items."""
    from chatretriever.retrieval.bm25 import BM25Retriever
    from chatretriever.retrieval.search import session_text

    bm25 = BM25Retriever(_as_rendered(items))

    def rank(sessions: Sequence[Session], depth: int) -> list[list[tuple[str, float]]]:
        return bm25.search_texts([session_text(s) for s in sessions], depth)

    return rank


def rank_items(
    rank: RankFn, sessions: Sequence[Session], depth: int = 100, name: str = "items"
) -> Run:
    """Rankings with each query's masked items removed, `depth` items per query."""
    extra = max((len(_exclude(s)) for s in sessions), default=0)
    hits = rank(sessions, depth + extra)
    scores: dict[str, dict[str, float]] = {}
    for s, row in zip(sessions, hits, strict=True):
        masked = set(_exclude(s))
        kept = [(i, sc) for i, sc in row if i not in masked][:depth]
        scores[s.id] = dict(kept)
    return Run(scores=scores, name=name)


def _query_metrics(
    session: Session,
    ranked: list[str],
    targets: set[str],
    metadata: Mapping[str, Mapping[str, Any]],
    ks: Sequence[int],
) -> dict[str, float]:
    task = session.metadata["task"]
    cons = [Constraint.from_dict(c) for c in session.metadata.get("constraints", ())]
    out = {}
    for k in ks:
        out[f"hit@{k}"] = hit_at_k(ranked, targets, k)
        if task in ATTRIBUTE_TASKS:
            out[f"constraint_coverage@{k}"] = constraint_coverage_at_k(ranked, cons, metadata, k)
        else:
            out[f"precision@{k}"] = precision_at_k(ranked, targets, k)
    return out


def evaluate_items(
    run: Run,
    sessions: Sequence[Session],
    qrels: Mapping[str, Mapping[str, int]],
    items: Sequence[Passage],
    ks: Sequence[int] = KS,
) -> dict[str, Any]:
    """Score a (masked) run per task.

    Args:
        run: The rankings (`rank_items`).
        sessions: The test queries (metadata: task, constraints).
        qrels: query id -> target item id -> 1.
        items: The catalog (for constraint coverage).
        ks: The cutoffs.

    Returns:
        {"tasks": {task: {measure: mean, ..., "nDCG@10", "queries": n}}, "mean": {measure:
        mean over the tasks that have it}}.
    """
    metadata = {p.id: item_metadata(p) for p in items}
    by_task: dict[str, list[Session]] = {}
    for s in sessions:
        task = s.metadata.get("task")
        if task not in TASKS:  # the table shows the known tasks only: the mean must too
            raise ValueError(f"query {s.id!r}: metadata.task must be one of {TASKS}, got {task!r}")
        if not qrels.get(s.id):
            raise ValueError(f"query {s.id!r} has no qrels")
        by_task.setdefault(task, []).append(s)
    if not by_task:
        raise ValueError("no test queries to evaluate")
    tasks: dict[str, dict[str, float]] = {}
    for task in sorted(by_task, key=TASKS.index):
        rows = [
            _query_metrics(s, [d.doc_id for d in run.ranked(s.id)], set(qrels[s.id]), metadata, ks)
            for s in by_task[task]
        ]
        result = {m: float(np.mean([r[m] for r in rows])) for m in rows[0]}
        task_qrels = {s.id: dict(qrels[s.id]) for s in by_task[task]}
        result["nDCG@10"] = _ndcg_at_10(run, task_qrels, task)
        result["queries"] = len(rows)
        tasks[task] = result
    names = dict.fromkeys(m for r in tasks.values() for m in r if m != "queries")
    mean = {m: float(np.mean([r[m] for r in tasks.values() if m in r])) for m in names}
    return {"tasks": tasks, "mean": mean}


def _ndcg_at_10(run: Run, task_qrels: dict[str, dict[str, int]], task: str) -> float:
    """nDCG@10 of one task's queries; 0 with a warning when the run retrieved nothing for any
    of them (BM25 on item texts that share no word with the task's queries): one such task
    must not stop the scoring of the others."""
    sub = Run({q: run.scores.get(q, {}) for q in task_qrels}, run.name)
    if not any(sub.scores.values()):
        logger.warning(
            "%s: the run %r retrieved nothing for any of its %d queries: scored 0",
            task,
            run.name,
            len(task_qrels),
        )
        return 0.0
    return evaluate_run(sub, task_qrels, ["nDCG@10"]).aggregate["nDCG@10"]


def load_test_set(
    data_dir: str | Path,
) -> tuple[list[Passage], list[Session], dict[str, dict[str, int]]]:
    """The catalog, test queries and qrels of a `build-items` output directory (the catalog
    rendered with the directory's `schema.json`: the schema it was built with).

    Everything is checked against the catalog, so that a changed test set stops with the file,
    line and field rather than scoring something else: a duplicate catalog id; a query without
    a known `task`, with an `exclude` that is not a list of catalog ids, or with a bad
    constraint; a query without qrels; a qrels line naming an unknown query or item; no query.
    """
    from chatretriever.io.files import iter_jsonl
    from chatretriever.io.sessions import session_from_dict
    from chatretriever.io.trec import read_qrels
    from chatretriever.methods.items.build import (
        CATALOG_FILE,
        QRELS_FILE,
        QUERIES_FILE,
        read_catalog,
    )
    from chatretriever.methods.items.schema import schema_of_dir
    from chatretriever.types import qrels_to_dict

    root = Path(data_dir)
    items = read_catalog(root / CATALOG_FILE, schema_of_dir(root))
    known = {p.id for p in items}
    path = root / QUERIES_FILE
    sessions: list[Session] = []
    lines: dict[str, int] = {}
    for line, obj in iter_jsonl(path):
        s = session_from_dict(obj, path, line)
        if s.id in lines:
            raise DataFormatError(path, f"duplicate id {s.id!r}", line, "id")
        _check_query(s, known, path, line)
        sessions.append(s)
        lines[s.id] = line
    if not sessions:
        raise DataFormatError(path, "no test queries")
    qrels = qrels_to_dict(read_qrels(root / QRELS_FILE, known_queries=lines, known_docs=known))
    for s in sessions:
        if not qrels.get(s.id):
            raise DataFormatError(
                path, f"query {s.id!r} has no line in {QRELS_FILE}", lines[s.id], "id"
            )
    return items, sessions, qrels


def _check_query(s: Session, known: set[str], path: Path, line: int) -> None:
    """A test query's metadata as `build-items` writes it (see `load_test_set`)."""
    task = s.metadata.get("task")
    if task not in TASKS:
        msg = f"expected a task code ({', '.join(TASKS)}), got {task!r}"
        raise DataFormatError(path, msg, line, "metadata.task")
    exclude = s.metadata.get("exclude", [])
    if not isinstance(exclude, list):
        msg = f"expected a list of item ids, got {type(exclude).__name__}"
        raise DataFormatError(path, msg, line, "metadata.exclude")
    for j, i in enumerate(exclude):
        if not isinstance(i, str) or i not in known:
            msg = (
                f"item id {i!r} names no item of the catalog"
                if isinstance(i, str)
                else f"expected an item id string, got {type(i).__name__}"
            )
            raise DataFormatError(path, msg, line, f"metadata.exclude[{j}]")
    cons = s.metadata.get("constraints", [])
    if not isinstance(cons, list):
        msg = f"expected a list of constraints, got {type(cons).__name__}"
        raise DataFormatError(path, msg, line, "metadata.constraints")
    for j, c in enumerate(cons):
        try:
            Constraint.from_dict(c)
        except ValueError as e:
            raise DataFormatError(path, str(e), line, f"metadata.constraints[{j}]") from None


def _exclude(session: Session) -> list[str]:
    masked = session.metadata.get("exclude", ())
    if isinstance(masked, str):
        raise TypeError(f"{session.id}: metadata.exclude must be a list of item ids, not a string")
    return list(masked)


def evaluate_ranker(
    rank: RankFn,
    items: Sequence[Passage],
    sessions: Sequence[Session],
    qrels: Mapping[str, Mapping[str, int]],
    name: str = "items",
) -> dict[str, Any]:
    """Rank (masked) and score one ranker on a test set; see `evaluate_items`."""
    run = rank_items(rank, sessions, name=name)
    return evaluate_items(run, sessions, qrels, items)


def results_table(results: Mapping[str, Mapping[str, Any]], measure: str = "hit@5") -> str:
    """A markdown table: one row per system, a column per task and the mean.

    Args:
        results: system name -> `evaluate_items` output.
        measure: The measure shown ("hit@5", "nDCG@10", ...).
    """
    tasks = [t for t in TASKS if any(t in r["tasks"] for r in results.values())]
    lines = [
        "| system | " + " | ".join(tasks) + " | mean |",
        "|---" * (len(tasks) + 2) + "|",
    ]
    for name, r in results.items():
        cells = [r["tasks"].get(t, {}).get(measure) for t in tasks]
        mean = r["mean"].get(measure)
        shown = ["-" if v is None else f"{v:.3f}" for v in (*cells, mean)]
        lines.append(f"| {name} | " + " | ".join(shown) + " |")
    return "\n".join(lines)
