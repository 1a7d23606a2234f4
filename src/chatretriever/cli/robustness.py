"""`chatretriever robustness`: one system under partial response and full context modification."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from chatretriever.cli.data import add_sessions_arguments, load_sessions
from chatretriever.retrieval.search import FORMULATIONS

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `robustness`."""
    from chatretriever.cli.pipeline import add_hybrid_arguments

    p = sub.add_parser(
        "robustness",
        help="robustness of a retriever to modified contexts (ChatRetriever paper, 4.3)",
        description="Partial response modification (an LLM answers from what the system "
        "retrieved, turn by turn; nDCG@3 and Diff) and full context modification (LLM-written "
        "two-turn contexts, one set per seed; Mean and SD of nDCG@3). Every generation is "
        "cached, so a rerun makes no LLM call; the modified datasets are written to --out.",
    )
    add_sessions_arguments(p, "; one session per evaluated turn")
    p.add_argument(
        "--qrels",
        required=True,
        nargs="+",
        help="TREC, BEIR or JSON qrels: files or directories of them, merged",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--index", help="corpus index directory (dense search; its passages are used)")
    p.add_argument("--model", help="query encoder (default: the index's model)")
    p.add_argument("--bm25", metavar="CORPUS", help="search a corpus with BM25 instead")
    p.add_argument("--formulation", choices=FORMULATIONS, default="session")
    p.add_argument("--llm-rewrite", action="store_true", help="search LLM rewrites (REW)")
    p.add_argument("--generator", default="smollm2-135m-instruct", help="chat LLM (causal)")
    p.add_argument("--cache", help="generation cache JSONL (default: OUT/generations.jsonl)")
    p.add_argument("--modes", nargs="+", choices=("partial", "full"), default=["partial", "full"])
    p.add_argument("--contexts", type=int, default=5, help="context sets of the full modification")
    p.add_argument("--max-new-tokens", type=int, default=192)
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--gen-batch-size", type=int, default=8, help="prompts per LLM call")
    p.add_argument(
        "--gen-dtype", default="auto", help="generator weights: auto (bf16 where native), ..."
    )
    p.add_argument("--max-retries", type=int, default=2, help="per malformed reply")
    p.add_argument("--k", type=int, default=100)
    add_hybrid_arguments(p)
    p.set_defaults(func=cmd_robustness)


def _system(args: argparse.Namespace, llm):
    """(system, passage id -> text, name) from --index/--model or --bm25."""
    from chatretriever.retrieval.robustness import systems
    from chatretriever.types import passage_text

    if bool(args.bm25) == bool(args.index):
        raise ValueError("give either --bm25 CORPUS or --index DIR")
    if args.bm25:
        from chatretriever.io.corpus import read_corpus
        from chatretriever.retrieval.bm25 import BM25Retriever

        if args.hybrid:
            raise ValueError("--hybrid fuses a dense index with its BM25 side: give --index DIR")
        corpus = read_corpus(args.bm25)
        passages = {p.id: passage_text(p) for p in corpus}
        formulation = "rewrite" if args.llm_rewrite else args.formulation
        system = systems.sparse_system(BM25Retriever(corpus), formulation, args.k)
        name = f"bm25.{formulation}"
    else:
        system, passages, name = _dense(args)
    if args.llm_rewrite:
        system, name = systems.rewrite_system(system, llm), f"{name}+llm_rewrite"
    return system, passages, name


def _dense(args: argparse.Namespace):
    from chatretriever.apps.registry import load_encoder, match_precision, query_model
    from chatretriever.cli.pipeline import hybrid_side
    from chatretriever.retrieval.corpus_index import CorpusIndex
    from chatretriever.retrieval.robustness import systems
    from chatretriever.types import passage_text

    loaded = CorpusIndex.load(args.index)
    if loaded.passages is None:
        raise ValueError(f"{args.index} keeps no passages: build it with `index CORPUS --out DIR`")
    model = query_model(args.model, loaded, args.index)
    encoder = load_encoder(model)
    match_precision(encoder, loaded.index.meta.fingerprint)  # the passages' precision
    formulation = "rewrite" if args.llm_rewrite else args.formulation
    system = systems.dense_system(encoder, loaded.index, formulation, args.k)
    name = f"{model}.{formulation}"
    if args.hybrid:
        bm25, bm25_formulation, fusion, _ = hybrid_side(args, loaded)
        sparse = systems.sparse_system(bm25, bm25_formulation, args.fusion_depth)
        system = systems.hybrid_system(system, sparse, fusion, args.k)
        name += f"+bm25.{bm25_formulation}.{args.hybrid}"
    passages = {i: passage_text(p) for i, p in loaded.passages.items()}
    return system, passages, name


def cmd_robustness(args: argparse.Namespace) -> int:
    from chatretriever.cli.pipeline import refuse_unused_hybrid_options
    from chatretriever.io.atomic import atomic_write
    from chatretriever.io.trec import read_qrels_files
    from chatretriever.retrieval.robustness.evaluation import evaluate_robustness
    from chatretriever.retrieval.robustness.generation import RobustnessLLM

    for flag in ("contexts", "max_new_tokens", "gen_batch_size", "k"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive")
    if args.max_retries < 0:
        raise ValueError("--max-retries must be 0 or more")
    if not args.temperature >= 0:  # also refuses nan
        raise ValueError(f"--temperature must be at least 0 (0: greedy), got {args.temperature}")
    refuse_unused_hybrid_options(args)
    sessions = load_sessions(args)
    if len(args.qrels) == 1:  # recorded as a string, as reports of one file always were
        args.qrels = args.qrels[0]
    qrels = read_qrels_files(args.qrels)
    _check_judged(sessions, qrels, args)
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out / "generations.jsonl"
    from chatretriever.modeling.precision import dtype_name
    from chatretriever.retrieval.robustness.generation import (
        LazyHFGenerator,
        generation_settings,
    )

    dtype = dtype_name(args.gen_dtype)
    settings = generation_settings(args.max_new_tokens, args.temperature, dtype)
    a = args
    llm = RobustnessLLM(
        LazyHFGenerator(a.generator, a.max_new_tokens, a.temperature, None, dtype),
        args.generator,
        cache,
        args.gen_batch_size,
        args.max_retries,
        settings,
    )
    try:
        system, passages, name = _system(args, llm)
        report = evaluate_robustness(
            {name: system}, sessions, qrels, passages, llm, out, args.contexts, modes=args.modes
        )
    finally:
        llm.close()
    report["settings"] = {k: v for k, v in vars(args).items() if k != "func"}
    report["systems"] = {**_earlier_systems(out / "robustness.json", report), **report["systems"]}
    with atomic_write(out / "robustness.json") as f:
        json.dump(report, f, indent=2)
    row = report["systems"][name]
    line = f"{name}: original nDCG@3 {row['original']:.4f}"
    if "partial" in row:
        line += f"; partial {row['partial']['nDCG@3']:.4f} (Diff {row['partial']['diff']:.4f})"
    if "full" in row:
        sd = row["full"]["sd"]
        sd_text = "n/a: one context set" if sd is None else f"{sd:.4f}"
        line += f"; full mean {row['full']['mean']:.4f} (SD {sd_text})"
    stats = report["llm"]
    sys.stdout.write(
        f"{line}\n{stats['generated']} generations, {stats['cached']} cached, retries "
        f"{stats['retries']}, failures {stats['failures']} -> {out / 'robustness.json'}\n"
    )
    return 0


def _check_judged(sessions: list, qrels: list, args: argparse.Namespace) -> None:
    """Refuse qrels that judge none of the sessions (before any model loads or generates)."""
    judged = {q.query_id for q in qrels}
    qrels_name = args.qrels if isinstance(args.qrels, str) else " ".join(args.qrels)
    if not judged:
        raise ValueError(f"{qrels_name}: holds no judgments")
    if not any(s.id in judged for s in sessions):
        raise ValueError(
            f"{qrels_name}: judges none of the {len(sessions)} sessions of {args.sessions} "
            f"(session ids such as {sessions[0].id!r}, judged ids such as {min(judged)!r})"
        )


# Settings that define the modified datasets and the generations: a report made under the same
# ones is the same experiment, so its other systems' rows are kept beside this one.
_SHARED_SETTINGS = (
    "sessions", "sessions_format", "rewrite_field", "qrels", "generator", "modes", "contexts",
    "max_new_tokens", "temperature", "gen_dtype", "max_retries",
)  # fmt: skip


def _earlier_systems(path: Path, report: dict) -> dict:
    """The rows of the other systems in an earlier `robustness.json` of the same experiment
    (one command per system into one --out builds one table); none when the settings differ."""
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        same = all(old["settings"].get(k) == report["settings"].get(k) for k in _SHARED_SETTINGS)
        same = same and old["llm"].get("prompts") == report["llm"]["prompts"]
        rows = dict(old["systems"]) if same else {}
    except (ValueError, KeyError, TypeError, AttributeError):
        rows = {}
    if not rows:
        logger.warning("%s: replacing an earlier report of other settings", path)
    return rows
