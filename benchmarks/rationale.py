"""Hidden-rationale retrieval on ESConv (issue 16): quality of every system, and the cost curves.

quality: Recall@1/3/5, MRR, nDCG@10 (`retrieval.evaluate`) on the evaluation dialogs of
  `configs/esconv-split.json`, for the strategy task (8 strategies) and the response task (every
  supporter turn of the evaluation dialogs; a query's own dialog is removed from its candidates
  except its gold). Systems: class prior (strategy only), BM25, minilm-l6 (and mpnet-base with
  `--mpnet`), the binary-choice reranker (zero-shot, or `--adapter`; strategy only, on
  `--rerank-limit` evenly spaced queries, where the other systems are reported too), each tuned
  reranker of `--reranker NAME=ADAPTER_DIR` (the same queries) and each Rabtriever student of
  `--student NAME=DIR` (`rerank-distill` output; both tasks, every query). Each reranker and
  student row has its timing. TREC runs and qrels are written.
cost: time per query of the reranker without KV reuse, with KV reuse (document caches computed
  offline) and the Rabtriever student, as the number of candidates and the document length grow.

    python benchmarks/rationale.py quality --rerank-limit 100      # heavy: run under the lock
    python benchmarks/rationale.py quality --reranker sft=runs/rationale-sft \
        --student distill=runs/rationale-distill
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


def _top_k_run(
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
    return _top_k_run(q @ p.T, sessions, docs, k, name or model)  # (Q, N) similarities


def dense_runs(
    args: argparse.Namespace, sessions: Sequence[Session], docs: Sequence[Passage], k: int
) -> dict[str, Run]:
    """The dense rows: MiniLM, mpnet with --mpnet, each --dense NAME=DIR."""
    models = [("minilm-l6", "minilm-l6")] + [("mpnet-base", "mpnet-base")] * args.mpnet
    return {n: dense_run(m, sessions, docs, k, n) for n, m in [*models, *args.dense]}


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


def _timing(seconds: float, queries: int, **offline: float) -> dict[str, Any]:
    """Online seconds (all queries, and per query) and any offline ones (document side), to 3
    significant digits (a student's query takes milliseconds)."""
    return {
        "seconds": float(f"{seconds:.3g}"),
        "queries": queries,
        "s_per_query": float(f"{seconds / max(1, queries):.3g}"),
        **{k: float(f"{v:.3g}") for k, v in offline.items()},
    }


def reranker_run(
    sessions: Sequence[Session],
    docs: Sequence[Passage],
    args: argparse.Namespace,
    adapter: str | None,
    name: str,
) -> tuple[Run, dict[str, Any]]:
    """The binary-choice reranker (`adapter`: a tuned LoRA dir, None: zero-shot) over every
    document, KV reuse; its run and timing."""
    from chatretriever.methods.rationale.reranker import BinaryChoiceReranker

    rr = BinaryChoiceReranker.from_pretrained(
        args.model,
        adapter=adapter,
        wording=args.wording,
        batch_size=args.batch_size,
        max_query_tokens=args.max_query_tokens,
    )
    start = time.perf_counter()
    matrix = rr.score_matrix(
        [passage_text(d) for d in docs], sessions, reuse_kv=True, show_progress=True
    )
    seconds = time.perf_counter() - start
    return _top_k_run(matrix, sessions, docs, len(docs), name), _timing(seconds, len(sessions))


def student_runs(
    directory: str,
    name: str,
    sessions: Sequence[Session],
    tasks_docs: dict[str, tuple[Sequence[Passage], int]],
    batch_size: int,
) -> dict[str, tuple[Run, dict[str, Any]]]:
    """A Rabtriever student (`rerank-distill` output) on each task: {task: (run, timing)}.

    Args:
        tasks_docs: {task: (candidates, depth kept per query)}.

    The query states are computed once for every task; each task's timing counts them with its
    own scoring (online), its document states apart (offline).
    """
    from chatretriever.methods.rationale.student import RabtrieverStudent

    student = RabtrieverStudent.from_pretrained(directory, batch_size=batch_size)
    start = time.perf_counter()
    queries = student.query_states(sessions, show_progress=True)  # (Q, H)
    query_s = time.perf_counter() - start
    out = {}
    for task, (docs, k) in tasks_docs.items():
        start = time.perf_counter()
        states = student.document_states([passage_text(d) for d in docs], True)  # (N, H)
        document_s = time.perf_counter() - start
        start = time.perf_counter()
        sims = student.score(queries, states).numpy()  # (Q, N)
        score_s = time.perf_counter() - start
        timing = _timing(query_s + score_s, len(sessions), document_states_s=document_s)
        out[task] = (_top_k_run(sims, sessions, docs, k, name), timing)
    return out


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
        "timing": {"strategy": {}, "strategy_subset": {}, "response": {}},
    }
    docs, rdocs = tasks.strategy_passages(), tasks.response_passages(evals)
    candidates = {"strategy": (docs, 8), "response": (rdocs, 200)}
    students = {n: student_runs(d, n, evals, candidates, args.batch_size) for n, d in args.student}
    # strategy retrieval
    qrels = tasks.strategy_qrels(evals)
    write_qrels(out / "strategy.qrels", qrels)
    runs = {
        "class-prior": tasks.class_prior_run(train, evals),
        "bm25": bm25_run(evals, docs, 8),
        **dense_runs(args, evals, docs, 8),
    }
    for name, by_task in students.items():
        runs[name], result["timing"]["strategy"][name] = by_task["strategy"]
    result["strategy"] = evaluate_all(runs, qrels, out, "strategy", settings)
    sub_qrels = tasks.strategy_qrels(subset)
    sub_runs = {n: _subset(r, {s.id for s in subset}) for n, r in runs.items()}
    rerankers = [] if args.skip_reranker else [(f"rahore-{args.tag}-{args.wording}", args.adapter)]
    for name, adapter in [*rerankers, *args.reranker]:
        sub_runs[name], result["timing"]["strategy_subset"][name] = reranker_run(
            subset, docs, args, adapter, name
        )
    result["strategy_subset"] = evaluate_all(sub_runs, sub_qrels, out, "strategy-subset", settings)
    # response retrieval
    rqrels = tasks.response_qrels(evals)
    write_qrels(out / "response.qrels", rqrels)
    rruns = {
        "bm25": bm25_run(evals, rdocs, 200),
        **dense_runs(args, evals, rdocs, 200),
    }
    for name, by_task in students.items():
        rruns[name], result["timing"]["response"][name] = by_task["response"]
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
        lines += [f"### {title}", "", *_table(result[key])]
        for name, t in result.get("timing", {}).get(key, {}).items():
            offline = t.get("document_states_s")
            offline = "" if offline is None else f"; document states {offline} s, offline"
            lines.append(f"- {name}: {t['seconds']} s for {t['queries']} queries "
                         f"({t['s_per_query']} s/query{offline})")  # fmt: skip
        lines.append("")
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


def named_dir(value: str) -> tuple[str, str]:
    """An argparse type: `NAME=DIR` with an existing DIR -> (NAME, DIR)."""
    name, sep, directory = value.partition("=")
    if not sep or not name.strip() or not directory.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    if not Path(directory).is_dir():
        raise argparse.ArgumentTypeError(f"{value!r}: {directory} is not a directory")
    return name, directory


BASELINES = ("class-prior", "bm25", "minilm-l6", "mpnet-base")


def _check_names(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Each --reranker / --student row needs its own name (rows are keyed by it)."""
    names = [n for n, _ in args.reranker + args.student + args.dense]
    if not args.skip_reranker:
        names.append(f"rahore-{args.tag}-{args.wording}")
    taken = sorted({n for n in names if names.count(n) > 1 or n in BASELINES})
    if taken:
        p.error(f"--reranker/--student/--dense names must be unique and not a baseline's: {taken}")


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
    q.add_argument(
        "--reranker",
        type=named_dir,
        action="append",
        default=[],
        metavar="NAME=ADAPTER_DIR",
        help="a tuned reranker row (repeatable)",
    )
    q.add_argument("--dense", type=named_dir, action="append", default=[], metavar="NAME=DIR",
                   help="a trained bi-encoder row (repeatable)")  # fmt: skip
    q.add_argument("--student", type=named_dir, action="append", default=[], metavar="NAME=DIR",
                   help="a Rabtriever student row, rerank-distill output (repeatable)")  # fmt: skip
    c = sub.add_parser("cost")
    c.add_argument("--out", default="outputs/rationale")
    c.add_argument("--model", default="smollm2-135m-instruct")
    c.add_argument("--candidates", type=int, nargs="+", default=[10, 30, 100])
    c.add_argument("--doc-tokens", type=int, nargs="+", default=[32, 128])
    c.add_argument("--query-tokens", type=int, default=64)
    c.add_argument("--queries", type=int, default=2)
    c.add_argument("--max-full-candidates", type=int, default=100, help="no-reuse runs up to")
    c.add_argument("--split", default=str(REPO / "configs" / "esconv-split.json"))
    args = p.parse_args(argv)
    if args.part == "quality":
        _check_names(q, args)
    return args


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
