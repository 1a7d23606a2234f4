"""The cost part of benchmarks/rationale.py: time per query of the reranker without KV reuse,
with KV reuse (document caches computed offline) and the Rabtriever student, as the number of
candidates and the document length grow."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from _rationale.env import environment, environment_words
from chatretriever.methods.rationale import tasks
from chatretriever.types import Session


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cost_inputs(args: argparse.Namespace, n_docs: int) -> tuple[list[str], list[Session]]:
    """Real supporter turns, concatenated and cut by the prompt to the document length, and
    real evaluation queries."""
    split = tasks.load_split(args.split, args.data_dir)
    evals = tasks.task_sessions(tasks.split_dialogs(split, "eval"))
    turns = [s.response or "" for s in evals]
    if len(turns) < n_docs:  # documents past the turns would be empty strings, timed as real
        raise SystemExit(
            f"--candidates up to {n_docs} needs as many supporter turns; the eval split of "
            f"{args.split} has {len(turns)}"
        )
    docs = [" ".join(turns[i : i + 40]) for i in range(n_docs)]  # long enough for any cut
    step = max(1, len(evals) // args.queries)
    return docs, evals[::step][: args.queries]


def _cost_one(
    rr: Any, enc: Any, predictor: Any, offline: dict[str, Any], queries: list[Session], n: int,
    max_full: int,
) -> dict[str, float | None]:  # fmt: skip
    """Seconds per query for the three systems over the first n documents (their caches and
    states were computed offline, once)."""
    from chatretriever.methods.rationale.distill import student_scores
    from chatretriever.methods.rationale.scoring import cached_option_logits

    p, docs = rr.prompt, offline["docs"][:n]
    caches, doc_states = offline["caches"][:n], offline["states"][:n]  # (n, H)
    row: dict[str, float | None] = {"full": None}
    if n <= max_full:
        row["full"] = sum(_timed(lambda q=q: rr.score_pairs(docs, [q] * n)) for q in queries)

    def reuse(q: Session) -> None:
        suffix = p.query_ids([q])[0]
        for start in range(0, n, rr.batch_size):
            batch = caches[start : start + rr.batch_size]
            cached_option_logits(rr.model, batch, [suffix] * len(batch), p.option_ids, rr.pad_id)

    def student(q: Session) -> None:
        student_scores(enc, predictor, enc.query_states([q])[0], doc_states)

    row["kv_reuse"] = sum(_timed(lambda q=q: reuse(q)) for q in queries)
    row["student"] = sum(_timed(lambda q=q: student(q)) for q in queries)
    return {k: None if v is None else v / len(queries) for k, v in row.items()}


def _offline(rr: Any, enc: Any, docs: list[str], queries: list[Session]) -> dict[str, Any]:
    """The document side (KV caches, student states), once; and one untimed call of each path
    (allocator and thread-pool warm-up)."""
    from chatretriever.methods.rationale.scoring import prefix_kv

    start = time.perf_counter()
    caches = [prefix_kv(rr.model, ids) for ids in rr.prompt.document_ids(docs)]
    cache_s = time.perf_counter() - start
    start = time.perf_counter()
    states = enc.document_states(docs)  # (N, H)
    states_s = time.perf_counter() - start
    rr.score_pairs(docs[:1], queries[:1])
    offline_s = {"kv_caches": round(cache_s, 2), "student_states": round(states_s, 2)}
    return {"docs": docs, "caches": caches, "states": states, "offline_s": offline_s}


def cost(args: argparse.Namespace) -> dict[str, Any]:
    """Time per query vs number of candidates and document length (fp32, batch 16)."""
    import torch

    from chatretriever.methods.rationale.distill import (
        Predictor,
        PredictorConfig,
        RabtrieverEncoder,
    )
    from chatretriever.methods.rationale.reranker import BinaryChoiceReranker

    torch.manual_seed(0)
    result: dict[str, Any] = {"environment": environment(), "rows": []}
    docs, queries = _cost_inputs(args, max(args.candidates))
    for length in args.doc_tokens:
        rr = BinaryChoiceReranker.from_pretrained(args.model, batch_size=16,
            max_document_tokens=length, max_query_tokens=args.query_tokens)  # fmt: skip
        enc = RabtrieverEncoder(rr.model, rr.prompt, batch_size=16)
        predictor = Predictor(PredictorConfig(hidden=rr.model.config.hidden_size)).eval()
        offline = _offline(rr, enc, docs, queries)
        result.setdefault("offline_seconds", {})[str(length)] = offline["offline_s"]
        for n in sorted(args.candidates):
            row = _cost_one(rr, enc, predictor, offline, queries, n, args.max_full_candidates)
            result["rows"].append({"doc_tokens": length, "candidates": n, **row})
            print(result["rows"][-1], flush=True)  # noqa: T201
    return result


def cost_markdown(result: dict[str, Any]) -> str:
    lines = [f"{environment_words(result['environment'])}; seconds per query (document side "
             "computed offline).", "",
             "| doc tokens | candidates | reranker, no reuse | reranker, KV reuse | student | "
             "no reuse / student |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        full = "-" if r["full"] is None else f"{r['full']:.2f}"
        ratio = "-" if r["full"] is None else f"{r['full'] / r['student']:.2f}x"
        lines.append(f"| {r['doc_tokens']} | {r['candidates']} | {full} | {r['kv_reuse']:.2f} | "
                     f"{r['student']:.3f} | {ratio} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_cost_plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["doc_tokens"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 3.5), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        rows = [r for r in result["rows"] if r["doc_tokens"] == length]
        for key, label in (("full", "reranker"), ("kv_reuse", "reranker + KV reuse"),
                           ("student", "Rabtriever student")):  # fmt: skip
            pts = [(r["candidates"], r[key]) for r in rows if r[key] is not None]
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set(xscale="log", yscale="log", xlabel="candidates", ylabel="s / query",
               title=f"document {length} tokens")  # fmt: skip
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
