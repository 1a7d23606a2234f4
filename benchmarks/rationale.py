"""Hidden-rationale retrieval on ESConv (issue 16): quality of every system, and the cost curves.

quality: Recall@1/3/5, MRR, nDCG@10 (`retrieval.evaluate`) on the evaluation dialogs of the
  shipped split (`methods/rationale/esconv-split.json`), for the strategy task (8 strategies) and
  the response task (every supporter turn of the evaluation dialogs; a query's own dialog is
  removed from its candidates except its gold). Systems: class prior (strategy only), BM25,
  minilm-l6 (and mpnet-base with `--mpnet`), the binary-choice reranker (zero-shot, or
  `--adapter`; strategy only, on `--rerank-limit` evenly spaced queries, where the other systems
  are reported too), each tuned reranker of `--reranker NAME=ADAPTER_DIR` (the same queries) and
  each Rabtriever student of `--student NAME=DIR` (`rerank-distill` output; both tasks, every
  query), each trained bi-encoder of `--dense NAME=DIR` (e.g. configs/rationale-biencoder.yaml's
  run; both tasks), and with `--rerank-response K` every reranker over minilm-l6's top K response
  candidates (the reranker's queries). Each reranker and student row has its timing (a reranker's
  with the prompt budgets it used: a tuned adapter's own, unless `--max-query-tokens` is given).
  TREC runs and qrels are written.
cost: time per query of the reranker without KV reuse, with KV reuse (document caches computed
  offline) and the Rabtriever student, as the number of candidates and the document length grow.
Each part writes OUT/<part>.{json,md,png}; those of a run with other options are kept as
OUT/<part>.prev[-N].*. Parts in _rationale/: runs (the dense and BM25 runs, their evaluation),
cost (the cost curves), report (quality's tables and plot), env (machine, `_shared/machine.py`).

    python benchmarks/rationale.py quality --rerank-limit 100      # heavy: run under the lock
    python benchmarks/rationale.py quality --reranker sft=runs/rationale-sft \
        --student distill=runs/rationale-distill
    python benchmarks/rationale.py cost --candidates 10 30 100 --doc-tokens 32 128
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chatretriever.io.trec import write_qrels
from chatretriever.methods.rationale import tasks
from chatretriever.retrieval.evaluate import write_json
from chatretriever.types import Passage, Run, Session, passage_text

# The helper package of this script, beside it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _conversational import script  # noqa: E402
from _conversational.systems import missing_model  # noqa: E402
from _rationale.cost import cost, cost_markdown, write_cost_plot  # noqa: E402
from _rationale.env import environment  # noqa: E402
from _rationale.report import MEASURES, quality_markdown, write_quality_plot  # noqa: E402
from _rationale.runs import bm25_run, dense_runs, evaluate_all, subset_run, top_k_run  # noqa: E402
from _shared.options import at_least  # noqa: E402
from _shared.paths import keep_previous, repo_path, run_settings  # noqa: E402

# The conversation budget of a reranker row without a tuned one (the zero-shot row, as reported).
ZERO_SHOT_QUERY_TOKENS = 256


def _timing(seconds: float, queries: int, **offline: float) -> dict[str, Any]:
    """Online seconds (all queries, and per query) and any offline ones (document side), to 3
    significant digits (a student's query takes milliseconds)."""
    return {
        "seconds": float(f"{seconds:.3g}"),
        "queries": queries,
        "s_per_query": float(f"{seconds / max(1, queries):.3g}"),
        **{k: float(f"{v:.3g}") for k, v in offline.items()},
    }


def _reranker(args: argparse.Namespace, adapter: str | None) -> Any:
    """The reranker of a row; its conversation budget is `--max-query-tokens`, else the
    adapter's tuned one, else `ZERO_SHOT_QUERY_TOKENS`; its document budget the adapter's tuned
    one, else the prompt's default (`tuned_adapter.resolve_budgets`)."""
    from chatretriever.methods.rationale.reranker import BinaryChoiceReranker
    from chatretriever.methods.rationale.tuned_adapter import resolve_adapter, tuned_budgets

    query_tokens = args.max_query_tokens
    tuned = {} if adapter is None else tuned_budgets(resolve_adapter(adapter))
    if query_tokens is None and "max_query_tokens" not in tuned:
        query_tokens = ZERO_SHOT_QUERY_TOKENS
    return BinaryChoiceReranker.from_pretrained(
        args.model,
        adapter=adapter,
        wording=args.wording,
        batch_size=args.batch_size,
        max_query_tokens=query_tokens,
    )


def _budgets(rr: Any) -> dict[str, int]:
    """The prompt budgets a reranker row was scored with (reported beside its timing)."""
    return {"document": rr.prompt.max_document_tokens, "query": rr.prompt.max_query_tokens}


def response_rerank_run(
    first: Run,
    sessions: Sequence[Session],
    docs: Sequence[Passage],
    args: argparse.Namespace,
    adapter: str | None,
    name: str,
) -> tuple[Run, dict[str, Any]]:
    """The reranker over the top `--rerank-response` of a first-stage response run (KV reuse:
    each candidate turn's cache is computed once for every query that retrieved it)."""
    rr = _reranker(args, adapter)
    texts = {d.id: passage_text(d) for d in docs}
    start = time.perf_counter()
    run = rr.rerank(first, texts, sessions, args.rerank_response, reuse_kv=True, show_progress=True)
    seconds = time.perf_counter() - start
    return Run(run.scores, name), {**_timing(seconds, len(sessions)), "budgets": _budgets(rr)}


def reranker_run(
    sessions: Sequence[Session],
    docs: Sequence[Passage],
    args: argparse.Namespace,
    adapter: str | None,
    name: str,
) -> tuple[Run, dict[str, Any]]:
    """The binary-choice reranker (`adapter`: a tuned LoRA dir, None: zero-shot) over every
    document, KV reuse; its run and timing."""
    rr = _reranker(args, adapter)
    start = time.perf_counter()
    matrix = rr.score_matrix(
        [passage_text(d) for d in docs], sessions, reuse_kv=True, show_progress=True
    )
    seconds = time.perf_counter() - start
    timing = {**_timing(seconds, len(sessions)), "budgets": _budgets(rr)}
    return top_k_run(matrix, sessions, docs, len(docs), name), timing


def student_runs(
    directory: str,
    name: str,
    sessions: Sequence[Session],
    tasks_docs: dict[str, tuple[Sequence[Passage], int]],
    batch_size: int,
    readings: dict[Any, dict[str, Any]] | None = None,
) -> dict[str, tuple[Run, dict[str, Any]]]:
    """A Rabtriever student (`rerank-distill` output) on each task: {task: (run, timing)}.

    Args:
        tasks_docs: {task: (candidates, depth kept per query)}.
        readings: States already computed by another student of the same teacher (its
            `reading_key`), with their measured seconds; filled in here.

    The query states are computed once for every task; each task's timing counts them with its
    own scoring (online), its document states apart (offline).
    """
    from chatretriever.methods.rationale.student import RabtrieverStudent

    student = RabtrieverStudent.from_pretrained(directory, batch_size=batch_size)
    readings = {} if readings is None else readings
    key = student.reading_key()
    seen = readings.setdefault(key, {}) if key is not None else {}
    if "queries" not in seen:
        start = time.perf_counter()
        seen["queries"] = student.query_states(sessions, show_progress=True)  # (Q, H)
        seen["query_s"] = time.perf_counter() - start
    queries, query_s = seen["queries"], seen["query_s"]
    out = {}
    for task, (docs, k) in tasks_docs.items():
        if task not in seen:
            start = time.perf_counter()
            states = student.document_states([passage_text(d) for d in docs], True)  # (N, H)
            seen[task] = (states, time.perf_counter() - start)
        states, document_s = seen[task]
        start = time.perf_counter()
        sims = student.score(queries, states).numpy()  # (Q, N)
        score_s = time.perf_counter() - start
        timing = _timing(query_s + score_s, len(sessions), document_states_s=document_s)
        out[task] = (top_k_run(sims, sessions, docs, k, name), timing)
    return out


def quality(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split = tasks.load_split(args.split, args.data_dir)
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
        "rerank_response": args.rerank_response,
        "timing": {"strategy": {}, "strategy_subset": {}, "response": {}},
    }
    docs, rdocs = tasks.strategy_passages(), tasks.response_passages(evals)
    candidates = {"strategy": (docs, 8), "response": (rdocs, 200)}
    readings: dict[Any, dict[str, Any]] = {}  # students of one teacher share its readings
    students = {
        n: student_runs(d, n, evals, candidates, args.batch_size, readings) for n, d in args.student
    }
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
    sub_runs = {n: subset_run(r, {s.id for s in subset}) for n, r in runs.items()}
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
    if args.rerank_response:  # the rerankers over MiniLM's top k, on the reranker's queries
        ids = {s.id for s in subset}
        sub = {n: subset_run(r, ids) for n, r in rruns.items()}
        result["timing"]["response_subset"] = {}
        for name, adapter in [*rerankers, *args.reranker]:
            sub[name], result["timing"]["response_subset"][name] = response_rerank_run(
                sub["minilm-l6"], subset, rdocs, args, adapter, name
            )
        rsub_qrels = tasks.response_qrels(subset)
        result["response_subset"] = evaluate_all(sub, rsub_qrels, out, "response-subset", settings)
    return result


def named_dir(value: str, kind: str | None = None) -> tuple[str, str]:
    """An argparse type: `NAME=DIR` with an existing DIR (or, with `kind`, a built-in model
    name of that kind: "rahore" adapters, "rabtriever" students) -> (NAME, DIR)."""
    from chatretriever.modeling.sources import BUILTIN_MODELS

    name, sep, directory = value.partition("=")
    if not sep or not name.strip() or not directory.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {value!r}")
    if Path(directory).is_dir():
        return name, directory
    builtins = sorted(n for n, info in BUILTIN_MODELS.items() if kind and info.kind == kind)
    if directory in builtins:
        return name, directory
    also = f" or a built-in name ({', '.join(builtins)})" if builtins else ""
    raise argparse.ArgumentTypeError(f"{value!r}: {directory} is not a directory{also}")


def _named(kind: str) -> Any:
    """`named_dir` that also takes the built-in models of `kind`."""

    def parse(value: str) -> tuple[str, str]:
        return named_dir(value, kind)

    return parse


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
    q.add_argument("--split", default=str(tasks.SHIPPED_SPLIT))
    q.add_argument(
        "--data-dir", help="ESConv data (default: the split's; the shipped split's, ../shared/data)"
    )
    q.add_argument("--out", default=repo_path("outputs/rationale"))
    q.add_argument("--model", default="smollm2-135m-instruct")
    q.add_argument("--wording", default="ab", choices=("ab", "tf"))
    q.add_argument(
        "--rerank-limit",
        type=at_least(0),
        default=100,
        help="eval queries the reranker scores (0: all)",
    )
    q.add_argument("--batch-size", type=at_least(1), default=8)
    q.add_argument("--max-query-tokens", type=at_least(1), metavar="N",
                   help="conversations keep their last N tokens (default: each tuned reranker's "
                   f"budget, from its recipe; else {ZERO_SHOT_QUERY_TOKENS})")  # fmt: skip
    q.add_argument("--rerank-response", type=int, default=0, metavar="K",
                   help="also rerank minilm-l6's top K response candidates (0: off)")  # fmt: skip
    q.add_argument("--mpnet", action="store_true", help="also all-mpnet-base-v2")
    q.add_argument("--skip-reranker", action="store_true")
    q.add_argument("--adapter", help="a tuned reranker adapter (rerank-train output)")
    q.add_argument("--tag", default="zeroshot", help="the reranker's name in the tables")
    q.add_argument(
        "--reranker",
        type=_named("rahore"),
        action="append",
        default=[],
        metavar="NAME=ADAPTER_DIR",
        help="a tuned reranker row: an adapter dir or a built-in one (rahore-smol); repeatable",
    )
    q.add_argument("--dense", type=named_dir, action="append", default=[], metavar="NAME=DIR",
                   help="a trained bi-encoder row (repeatable)")  # fmt: skip
    q.add_argument("--student", type=_named("rabtriever"), action="append", default=[],
                   metavar="NAME=DIR", help="a Rabtriever student row: rerank-distill output or "
                   "a built-in one (rabtriever-smol); repeatable")  # fmt: skip
    c = sub.add_parser("cost")
    c.add_argument("--out", default=repo_path("outputs/rationale"))
    c.add_argument("--model", default="smollm2-135m-instruct")
    c.add_argument("--candidates", type=at_least(1), nargs="+", default=[10, 30, 100])
    c.add_argument("--doc-tokens", type=at_least(1), nargs="+", default=[32, 128])
    c.add_argument("--query-tokens", type=at_least(1), default=64)
    c.add_argument("--queries", type=at_least(1), default=2)
    c.add_argument(
        "--max-full-candidates", type=at_least(0), default=100, help="no-reuse runs up to"
    )
    c.add_argument("--split", default=str(tasks.SHIPPED_SPLIT))
    c.add_argument(
        "--data-dir", help="ESConv data (default: the split's; the shipped split's, ../shared/data)"
    )
    args = p.parse_args(argv)
    if args.data_dir is None and Path(args.split).resolve() == tasks.SHIPPED_SPLIT.resolve():
        # the shipped split's data_dir is the project's layout: found from any directory
        args.data_dir = repo_path("../shared/data/esconv")
    part = q if args.part == "quality" else c
    if not Path(args.split).is_file():
        part.error(f"--split {args.split}: no such file")
    needed = [args.model]
    if args.part == "quality":
        _check_names(q, args)
        if args.rerank_response < 0:
            q.error(f"--rerank-response must be >= 0, got {args.rerank_response}")
        needed += ["minilm-l6", *(["mpnet-base"] if args.mpnet else [])]
        needed += [d for _, d in args.reranker + args.student]  # built-ins: shipped?
    for reason in filter(None, map(missing_model, needed)):
        part.error(reason)  # before any work, not after the first rows
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "quality":
        result, markdown, plot = quality(args), quality_markdown, write_quality_plot
    else:
        result, markdown, plot = cost(args), cost_markdown, write_cost_plot
    result["settings"] = run_settings(args)
    files = [out / f"{args.part}.{ext}" for ext in ("json", "md", "png")]
    keep_previous(files, result["settings"])
    write_json(files[0], result)
    files[1].write_text(markdown(result), encoding="utf-8")
    plot(files[2], result)
    sys.stdout.write(markdown(result))
    return 0


if __name__ == "__main__":
    script.run(main)
