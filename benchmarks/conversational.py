"""MTRAG-UN conversational retrieval benchmark: BM25, LLM rewrites, dense embedders, ChatRetriever.

Every system searches the shared MTRAG corpus (all four domains in one collection) for the
MTRAG-UN tasks and writes a TREC run and its settings into OUT/runs/. A finished run whose
settings match is reused, so an interrupted benchmark resumes where it stopped; corpus embeddings
are written chunk by chunk into OUT/emb/<model>/ (`chatretriever.retrieval.encode`, resumable)
and LLM rewrites into a cache file in OUT, so a rerun costs nothing.

Systems (`--systems`, default: every family whose packages are installed):
    bm25           BM25 (bm25s) on last_turn, all_user_turns, full_history (+ rewrite when the
                   dataset carries rewrites; MTRAG does not)
    rewrite        LLM4CS "REW": a chat LLM rewrites the last question, then BM25 and an embedder
    dense          sentence embedders (`--dense`) on last_turn, all_user_turns, full_history
    chatretriever  each `--model NAME=DIR_OR_BUILTIN`, reading the whole session
    (hybrid)       with `--hybrid rrf linear`: each ChatRetriever run (whole session) and each
                   dense embedder's all_user_turns run fused with BM25 on `--bm25-formulation`
                   (`chatretriever.retrieval.fusion`; `--rrf-k`, `--fusion-weight` = dense weight)

`--pool P` searches a pooled corpus instead of all 38,104 passages: the passages judged for the
evaluated tasks plus BM25's top P of each on its last turn (`_conversational.pool`), for the
evaluated tasks only; a model then costs the pool's encoding (a few thousand passages). Pooled
numbers are comparable with each other, not with full-corpus ones (fewer distractors); runs,
embeddings and results are kept apart (OUT/runs.<pool tag>/, results.<...>.pool<P>.*).

Dense search uses a Faiss Flat index when Faiss is installed, else an exact numpy top-k, so runs
can be made on a GPU machine with only torch and transformers (`--runs-only`) and evaluated later.

    python benchmarks/conversational.py --systems bm25
    python benchmarks/conversational.py --runs-only --device cuda --systems chatretriever \\
        --model csit=outputs/model

The parts live in benchmarks/_conversational/: systems (what runs), tasks (what is evaluated),
backends (models, dense indexes), runs (the cached runs), report (metrics, tables, plot).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from chatretriever.io.mtrag import load_mtrag
from chatretriever.retrieval.fusion import DEFAULT_RRF_K, FUSION_METHODS, FusionConfig

# The helper package beside this script: on sys.path when the script runs, not when it is imported
# from its file (tests/test_benchmarks.py).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _conversational import backends, report, runs, script, systems, tasks  # noqa: E402
from _shared.machine import machine  # noqa: E402
from _shared.paths import repo_path, run_settings  # noqa: E402


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--data", default=repo_path("../shared/data/mtrag"), help="the MTRAG directory")
    p.add_argument("--out", default=repo_path("outputs/benchmark"), help="output directory")
    p.add_argument("--systems", nargs="+", choices=systems.FAMILIES, default=list(systems.FAMILIES))
    p.add_argument("--dense", nargs="*", default=["minilm-l6", "mpnet-base"], help="embedders")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=DIR_OR_BUILTIN",
        help="a ChatRetriever (saved dir or base chat LLM); repeatable. Embeddings and runs are "
        "kept per model fingerprint (weights, settings, precision), so a model retrained in "
        "place is encoded again",
    )
    p.add_argument("--rewrite-model", default=systems.REWRITE_MODEL, help="chat LLM for rewrites")
    p.add_argument("--rewrite-dense", default="minilm-l6", help="embedder run on rewrites")
    p.add_argument("--max-new-tokens", type=int, default=64, help="of one rewrite")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the accelerator, else cpu)")
    p.add_argument("--k", type=int, default=100, help="passages per query in a run")
    p.add_argument("--batch-size", type=int, default=64, help="passages per encoder call")
    p.add_argument("--query-batch-size", type=int, default=32, help="queries per encoder call")
    p.add_argument("--chunk-size", type=int, default=5000, help="passages per embedding chunk")
    p.add_argument("--eval-conversations", metavar="FILE", help="conversation ids to evaluate")
    p.add_argument(
        "--pool",
        type=int,
        default=0,
        metavar="P",
        help="search a pooled corpus: the passages judged for the evaluated tasks plus BM25's "
        "top P of each on its last turn (0: the whole corpus). Pooled numbers are comparable "
        "with each other only; runs, embeddings and results are kept apart from full ones",
    )
    p.add_argument(
        "--hybrid", nargs="+", choices=FUSION_METHODS, default=[], help="fused rows (see above)"
    )
    p.add_argument("--rrf-k", type=int, default=DEFAULT_RRF_K, help="k of reciprocal rank fusion")
    p.add_argument("--fusion-weight", type=float, default=0.5, help="dense weight; BM25: 1 - it")
    p.add_argument(
        "--bm25-formulation",
        choices=systems.QUERY_FORMULATIONS,
        default="last_turn",
        help="BM25 side of the hybrid rows",
    )
    p.add_argument("--runs-only", action="store_true", help="write runs, skip evaluation")
    p.add_argument("-v", "--verbose", action="store_true", help="log library messages (INFO)")
    args = p.parse_args(argv)
    for name in ("k", "batch_size", "query_batch_size", "chunk_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.pool < 0:
        p.error("--pool must be at least 0")
    if args.eval_conversations and not Path(args.eval_conversations).is_file():
        p.error(f"--eval-conversations {args.eval_conversations}: no such file")
    try:
        FusionConfig("rrf", args.rrf_k, args.fusion_weight)
    except ValueError as e:
        p.error(str(e))
    return args


def results_settings(args: argparse.Namespace) -> dict:
    """The options that shape the results (file names hold only the tasks file's stem and the
    pool): a results file of other settings is kept aside rather than replaced."""
    settings = run_settings(args, "verbose", "runs_only")
    if args.eval_conversations:
        settings["eval_conversations"] = str(Path(args.eval_conversations).resolve())
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.runs_only and (why := systems.missing_module("ir_measures", "eval")):
        raise SystemExit(f"evaluation needs ir_measures: {why}; or use --runs-only")
    data = load_mtrag(args.data)
    if data.corpus_path is None:
        raise SystemExit(f"{args.data}: no corpus.jsonl(.gz) beside the tasks")
    has_rewrites = any(s.rewrite for s in data.sessions)
    planned, skipped = systems.plan_systems(args, has_rewrites)
    for s in skipped:
        print(f"skip {s['system']}: {s['reason']}")
    if not planned:
        raise SystemExit("no system to run (see the skip messages above)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"MTRAG-UN: {len(data.sessions)} tasks, {len(data.qrels)} judgments; "
        f"{len(planned)} systems; dense search: "
        f"{'faiss Flat' if backends.have_faiss() else 'numpy exact'}"
    )
    sessions, qrels, suffix = data.sessions, data.qrels, ""
    if args.eval_conversations:
        convs = tasks.read_conversations(args.eval_conversations)
        sessions, qrels = tasks.restrict(sessions, qrels, convs, args.eval_conversations)
        suffix = "." + systems.slug(Path(args.eval_conversations).stem)
    pool = runs.Pool(args.pool, sessions, qrels) if args.pool else None
    if pool:
        suffix += f".pool{args.pool}"
    # a pool is made for the evaluated tasks: only they are searched
    ws = runs.Workspace(args, sessions if pool else data.sessions, data.corpus_path, pool)
    records = runs.produce_runs(planned, ws, args.data)
    if args.runs_only:
        for r in records:
            print(f"{r['id']}\t{r['wall_s']:.1f} s\t{r['run']}")
        return 0
    names = report.measures(args.k)  # recall at the runs' depth, at most 100
    baseline = report.evaluate_records(records, qrels, names)
    summary = {
        "command": shlex.join(["python", "benchmarks/conversational.py", *argv]),
        "data": args.data,
        "tasks": len(sessions),
        "queries_evaluated": records[0]["num_queries"],
        "corpus_passages": records[0]["corpus_passages"],
        "eval_conversations": args.eval_conversations,
        "pool": ws.pool_info(),
        "k": args.k,
        "measures": list(names),
        "baseline": baseline,
        "skipped": skipped,
        "settings": results_settings(args),
        "machine": machine(),
    }
    table = report.write_results(out, suffix, summary, records, baseline)
    print(table)
    print(f"-> {out / f'results{suffix}'}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    script.run(main)
