"""Sub-commands that score and rewrite: evaluate (a run against qrels), rewrite (LLM rewrites)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from chatretriever.cli.data import add_sessions_arguments, load_sessions
from chatretriever.cli.pipeline import _echo
from chatretriever.errors import DataFormatError


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `evaluate` and `rewrite`."""
    p = sub.add_parser("evaluate", help="score a TREC run against qrels")
    p.add_argument("run", help="TREC run file")
    p.add_argument(
        "qrels",
        nargs="+",
        help="TREC, BEIR or JSON qrels: one or more files or directories of them, merged "
        "(e.g. MTRAG's qrels/ with a file per domain)",
    )
    p.add_argument("--measures", nargs="+", help="ir_measures names (default: nDCG@3 ...)")
    p.add_argument("--rel", type=int, default=1, help="relevance threshold of binary measures")
    p.add_argument(
        "--drop-no-relevant",
        action="store_true",
        help="leave queries without any judgment >= --rel out of the means (default: they are "
        "reported and count as zeros)",
    )
    p.add_argument("--per-query", action="store_true", help="print per-query values")
    p.add_argument(
        "--compare",
        metavar="RUN2",
        help="paired significance tests against the baseline RUN2 (printed as RUN2 -> RUN)",
    )
    p.add_argument("--out", help="write the results as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("rewrite", help="rewrite last questions into standalone ones with an LLM")
    add_sessions_arguments(p, judged=True)
    p.add_argument("--out", required=True, help="sessions JSONL with `rewrite` set")
    p.add_argument("--model", default="smollm2-135m-instruct", help="chat LLM (causal)")
    p.add_argument("--cache", help="rewrite cache JSONL (default: <out>.cache.jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_rewrite)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from chatretriever.io.trec import read_qrels_files
    from chatretriever.retrieval.evaluate import DEFAULT_MEASURES, compare, evaluate_run, write_json

    qrels = read_qrels_files(args.qrels)
    if not qrels:
        raise DataFormatError(" ".join(args.qrels), "holds no judgments: nothing to evaluate")
    measures = args.measures or list(DEFAULT_MEASURES)
    drop = args.drop_no_relevant
    result = evaluate_run(_read_results(args.run), qrels, measures, args.rel, drop)
    _print_evaluation(args.run, result, args.per_query)
    qrels_files = args.qrels[0] if len(args.qrels) == 1 else args.qrels
    out = {"run": args.run, "qrels": qrels_files, **result.to_dict(per_query=args.per_query)}
    if args.compare:
        other = evaluate_run(_read_results(args.compare), qrels, measures, args.rel, drop)
        tests = compare(other, result)  # RUN2 is the baseline: a = RUN2, b = RUN
        _print_comparison(args.compare, args.run, tests)
        # tests: "a" is the baseline RUN2, "b" the evaluated run, "diff" = b - a
        out["compare"] = {"baseline": args.compare, "evaluation": other.to_dict(False),
                          "tests": tests}  # fmt: skip
    if args.out:
        write_json(args.out, out)
    return 0


def _read_results(path: str):
    from chatretriever.io.trec import read_run

    run = read_run(path)
    if not run.scores:
        raise DataFormatError(path, "holds no results: nothing to evaluate")
    return run


def _print_evaluation(name: str, result, per_query: bool) -> None:
    _echo(
        f"# {name}: {result.num_queries} judged queries evaluated "
        f"({len(result.missing_from_run)} missing from the run, counted as 0); "
        f"{len(result.unjudged_in_run)} run queries without judgments excluded"
    )
    if result.no_relevant:
        what = "left out" if result.no_relevant_dropped else "evaluated (--drop-no-relevant drops)"
        _echo(
            f"# {len(result.no_relevant)} judged queries have no judgment >= {result.rel}, "
            f"{what}: {', '.join(result.no_relevant[:5])}"
            + (" ..." if len(result.no_relevant) > 5 else "")
        )
    for measure, value in result.aggregate.items():
        _echo(f"{measure}\tall\t{value:.4f}")
    if per_query:
        for qid, values in result.per_query.items():
            for measure, value in values.items():
                _echo(f"{measure}\t{qid}\t{value:.4f}")


def _print_comparison(baseline: str, run: str, tests: dict) -> None:
    """Each measure as baseline -> run (run - baseline), with the tests' p-values."""
    _echo(f"# {run} against the baseline {baseline}: baseline -> run (difference), paired t-test "
          "and randomization test")  # fmt: skip
    for measure, t in tests.items():
        _echo(
            f"{measure}\t{t['a']:.4f} -> {t['b']:.4f} ({t['diff']:+.4f})\t"
            f"t p={t['t_test_p']:.4g}\trand p={t['randomization_p']:.4g}"
        )


def cmd_rewrite(args: argparse.Namespace) -> int:
    from chatretriever.io.atomic import atomic_write
    from chatretriever.io.sessions import write_sessions
    from chatretriever.retrieval.rewrite import RewritePrompt, hf_generator, rewrite_sessions

    sessions = load_sessions(args)
    out = Path(args.out)
    cache = args.cache or out.with_name(out.name + ".cache.jsonl")
    generate = _lazy(lambda: hf_generator(args.model, args.max_new_tokens))
    rewritten = rewrite_sessions(sessions, generate, args.model, cache_path=cache)
    write_sessions(out, rewritten)
    settings = {
        "sessions": args.sessions,
        "judged": args.judged,
        "model": args.model,
        "max_new_tokens": args.max_new_tokens,
        "prompt": asdict(RewritePrompt()),
        "prompt_hash": RewritePrompt().hash,
        "cache": str(cache),
    }
    with atomic_write(out.with_name(out.name + ".settings.json")) as f:
        json.dump(settings, f, indent=2)
    _echo(f"{len(rewritten)} sessions rewritten with {args.model} -> {out} (cache: {cache})")
    return 0


def _lazy(factory):
    """A generator that loads its model on the first call only (all-cached reruns load none)."""
    loaded = []

    def generate(messages):
        if not loaded:
            loaded.append(factory())
        return loaded[0](messages)

    return generate
