"""Hidden-rationale retrieval on ESConv (issue 16): quality of every system, and the cost curves.

quality: Recall@1/3/5, MRR, nDCG@10 (`retrieval.evaluate`) on the evaluation dialogs of
  `configs/esconv-split.json`, for the strategy task (8 strategies) and the response task (every
  supporter turn of the evaluation dialogs; a query's own dialog is removed from its candidates
  except its gold). Systems: class prior (strategy only), BM25, minilm-l6 (and mpnet-base with
  `--mpnet`), and the zero-shot binary-choice reranker (strategy only; `--rerank-limit` queries,
  the baselines are then reported on the same queries too). TREC runs and qrels are written.
cost: time per query of the reranker without KV reuse, with KV reuse (document caches computed
  offline) and the Rabtriever student, as the number of candidates and the document length grow.

    python benchmarks/rationale.py quality --rerank-limit 100      # heavy: run under the lock
    python benchmarks/rationale.py cost --candidates 10 30 100 --doc-tokens 32 128
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chatretriever.io.trec import write_qrels
from chatretriever.methods.rationale import tasks
from chatretriever.retrieval.evaluate import evaluate_run, write_json
from chatretriever.retrieval.search import save_run
from chatretriever.types import Passage, Run, Session, passage_text

MEASURES = ("R@1", "R@3", "R@5", "RR", "nDCG@10")
REPO = Path(__file__).resolve().parents[1]


def _cpu() -> str:
    for line in (
        Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else ()
    ):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def environment() -> dict[str, Any]:
    import torch

    return {
        "cpu": _cpu(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "command": "python " + shlex.join(sys.argv),
    }


def _matrix_run(
    matrix: np.ndarray, sessions: Sequence[Session], docs: Sequence[Passage], name: str
) -> Run:
    scores = {
        s.id: {d.id: float(v) for d, v in zip(docs, row, strict=True)}
        for s, row in zip(sessions, matrix, strict=True)
    }
    return Run(scores, name)


def dense_run(model: str, sessions: Sequence[Session], docs: Sequence[Passage], k: int) -> Run:
    """Exact inner-product search with an off-the-shelf sentence embedder."""
    from chatretriever.retrieval.baselines import TextEmbedder

    enc = TextEmbedder.from_pretrained(model)
    q = enc.encode_sessions(sessions, batch_size=32)  # (Q, D)
    p = enc.encode_passages(docs, batch_size=64)  # (N, D)
    sims = q @ p.T  # (Q, N)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    scores = {s.id: {docs[j].id: float(sims[i, j]) for j in top[i]} for i, s in enumerate(sessions)}
    return Run(scores, model)


def bm25_run(sessions: Sequence[Session], docs: Sequence[Passage], k: int) -> Run:
    from chatretriever.retrieval.baselines import BM25Retriever

    return BM25Retriever(docs).search(sessions, k=k, formulation="full_history")


def _subset(run: Run, ids: set[str]) -> Run:
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


def zero_shot(
    sessions: Sequence[Session], docs: Sequence[Passage], args: argparse.Namespace
) -> tuple[Run, dict[str, Any]]:
    from chatretriever.methods.rationale.reranker import BinaryChoiceReranker

    rr = BinaryChoiceReranker.from_pretrained(
        args.model,
        adapter=args.adapter,
        wording=args.wording,
        batch_size=args.batch_size,
        max_query_tokens=args.max_query_tokens,
    )
    start = time.perf_counter()
    matrix = rr.score_matrix(
        [passage_text(d) for d in docs], sessions, reuse_kv=True, show_progress=True
    )
    seconds = time.perf_counter() - start
    timing = {
        "seconds": round(seconds, 1),
        "queries": len(sessions),
        "s_per_query": round(seconds / max(1, len(sessions)), 3),
    }
    return _matrix_run(matrix, sessions, docs, f"rahore-{args.tag}-{args.wording}"), timing


def quality(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split = tasks.load_split(args.split)
    train = tasks.task_sessions(tasks.split_dialogs(split, "train"))
    evals = tasks.task_sessions(tasks.split_dialogs(split, "eval"))
    # Evenly spaced over the evaluation dialogs (the first ones alone are not representative).
    step = max(1, len(evals) // args.rerank_limit) if args.rerank_limit else 1
    subset = evals[::step][: args.rerank_limit] if args.rerank_limit else evals
    settings = {"split": args.split, "measures": MEASURES}
    result: dict[str, Any] = {
        "environment": environment(),
        "queries": len(evals),
        "rerank_queries": len(subset),
    }
    # strategy retrieval
    docs = tasks.strategy_passages()
    qrels = tasks.strategy_qrels(evals)
    write_qrels(out / "strategy.qrels", qrels)
    runs = {
        "class-prior": tasks.class_prior_run(train, evals),
        "bm25": bm25_run(evals, docs, 8),
        "minilm-l6": dense_run("minilm-l6", evals, docs, 8),
    }
    if args.mpnet:
        runs["mpnet-base"] = dense_run("mpnet-base", evals, docs, 8)
    result["strategy"] = evaluate_all(runs, qrels, out, "strategy", settings)
    sub_qrels = tasks.strategy_qrels(subset)
    sub_runs = {n: _subset(r, {s.id for s in subset}) for n, r in runs.items()}
    if not args.skip_reranker:
        run, timing = zero_shot(subset, docs, args)
        sub_runs[run.name] = run
        result["reranker_timing"] = timing
    result["strategy_subset"] = evaluate_all(sub_runs, sub_qrels, out, "strategy-subset", settings)
    # response retrieval
    rdocs = tasks.response_passages(evals)
    rqrels = tasks.response_qrels(evals)
    write_qrels(out / "response.qrels", rqrels)
    rruns = {
        "bm25": bm25_run(evals, rdocs, 200),
        "minilm-l6": dense_run("minilm-l6", evals, rdocs, 200),
    }
    if args.mpnet:
        rruns["mpnet-base"] = dense_run("mpnet-base", evals, rdocs, 200)
    rruns = {n: tasks.restrict_to_other_dialogs(r, evals, rdocs) for n, r in rruns.items()}
    result["response"] = evaluate_all(rruns, rqrels, out, "response", settings)
    result["response_candidates"] = len(rdocs)
    return result


def _table(rows: dict[str, dict[str, float]]) -> list[str]:
    lines = [
        "| system | queries | " + " | ".join(MEASURES) + " |",
        "|---|---|" + "---|" * len(MEASURES),
    ]
    for name, row in rows.items():
        vals = " | ".join(f"{100 * row[m]:.1f}" for m in MEASURES)
        lines.append(f"| {name} | {row['queries']} | {vals} |")
    return lines


def quality_markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"`{env['command']}` on {env['cpu']} ({env['cpu_count']} cores, "
        f"load {env['loadavg_1_5_15']}); values x100.",
        "",
    ]
    for key, title in (
        ("strategy", "Strategy retrieval (8 strategies), all eval queries"),
        (
            "strategy_subset",
            f"Strategy retrieval, {result['rerank_queries']} evenly spaced eval queries",
        ),
        ("response", f"Response retrieval ({result['response_candidates']} supporter turns)"),
    ):
        lines += [f"### {title}", "", *_table(result[key]), ""]
    if "reranker_timing" in result:
        t = result["reranker_timing"]
        lines.append(
            f"Zero-shot reranker: {t['seconds']} s for {t['queries']} queries x 8 strategies "
            f"({t['s_per_query']} s/query, KV reuse)."
        )
    return "\n".join(lines) + "\n"


def write_quality_plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["strategy_subset"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(rows)
    for i, m in enumerate(MEASURES):
        ax.bar(np.arange(len(names)) + i * 0.15, [rows[n][m] for n in names], width=0.15, label=m)
    ax.set_xticks(np.arange(len(names)) + 0.3, names, rotation=15, fontsize=8)
    ax.set_title("ESConv strategy retrieval (eval subset)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------- cost
def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cost_inputs(args: argparse.Namespace, n_docs: int) -> tuple[list[str], list[Session]]:
    """Real supporter turns, concatenated and cut by the prompt to the document length, and
    real evaluation queries."""
    split = tasks.load_split(args.split)
    evals = tasks.task_sessions(tasks.split_dialogs(split, "eval"))
    turns = [s.response or "" for s in evals]
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
    env = result["environment"]
    lines = [f"`{env['command']}` on {env['cpu']} ({env['cpu_count']} cores, load "
             f"{env['loadavg_1_5_15']}); seconds per query (document side computed offline).", "",
             "| doc tokens | candidates | reranker, no reuse | reranker, KV reuse | student | "
             "no reuse / student |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        full = "-" if r["full"] is None else f"{r['full']:.2f}"
        ratio = "-" if r["full"] is None else f"{r['full'] / r['student']:.0f}x"
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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="part", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--split", default=str(REPO / "configs" / "esconv-split.json"))
    q.add_argument("--out", default="outputs/rationale")
    q.add_argument("--model", default="smollm2-135m-instruct")
    q.add_argument("--wording", default="ab", choices=("ab", "tf"))
    q.add_argument(
        "--rerank-limit", type=int, default=100, help="eval queries the reranker scores (0: all)"
    )
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--max-query-tokens", type=int, default=256)
    q.add_argument("--mpnet", action="store_true", help="also all-mpnet-base-v2")
    q.add_argument("--skip-reranker", action="store_true")
    q.add_argument("--adapter", help="a tuned reranker adapter (rerank-train output)")
    q.add_argument("--tag", default="zeroshot", help="the reranker's name in the tables")
    c = sub.add_parser("cost")
    c.add_argument("--out", default="outputs/rationale")
    c.add_argument("--model", default="smollm2-135m-instruct")
    c.add_argument("--candidates", type=int, nargs="+", default=[10, 30, 100])
    c.add_argument("--doc-tokens", type=int, nargs="+", default=[32, 128])
    c.add_argument("--query-tokens", type=int, default=64)
    c.add_argument("--queries", type=int, default=2)
    c.add_argument("--max-full-candidates", type=int, default=100, help="no-reuse runs up to")
    c.add_argument("--split", default=str(REPO / "configs" / "esconv-split.json"))
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "quality":
        result = quality(args)
        write_json(out / "quality.json", result)
        (out / "quality.md").write_text(quality_markdown(result), encoding="utf-8")
        write_quality_plot(out / "quality.png", result)
        sys.stdout.write(quality_markdown(result))
    else:
        result = cost(args)
        write_json(out / "cost.json", result)
        (out / "cost.md").write_text(cost_markdown(result), encoding="utf-8")
        write_cost_plot(out / "cost.png", result)
        sys.stdout.write(cost_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
