"""Sub-commands of hidden-rationale retrieval: `rerank` (the binary-choice LLM reranker over any
first-stage run), `esconv-tasks` (the ESConv strategy and response retrieval tasks),
`rerank-train` (tuning the reranker) and `rerank-distill` (its Rabtriever student)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chatretriever.cli.data import add_sessions_arguments, load_sessions
from chatretriever.methods.rationale.prompts import default_budgets
from chatretriever.modeling.recipe import SAVED_RECIPE

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `rerank` and `esconv-tasks`."""
    p = sub.add_parser(
        "rerank",
        help="rerank the top-k of a TREC run with a binary-choice chat LLM (RaHoRe)",
        description="Each (document, conversation) pair is scored by log P(yes) over the two "
        "options at the answer position, one forward pass per batch; with KV reuse (default) "
        "a document's prefix is computed once for every query that retrieved it.",
    )
    p.add_argument("--run", required=True, help="first-stage TREC run")
    p.add_argument("--corpus", required=True, help="BEIR corpus JSONL (.gz ok)")
    add_sessions_arguments(p, "; the run's queries")
    p.add_argument("--out", required=True, help="reranked TREC run to write")
    p.add_argument("--model", default="smollm2-135m-instruct", help="chat LLM (causal)")
    p.add_argument(
        "--adapter", help="a tuned LoRA adapter dir for --model, or the built-in 'rahore-smol'"
    )
    p.add_argument("--wording", choices=("ab", "tf"), default="ab", help="prompt wording")
    p.add_argument("--k", type=int, default=20, help="top documents reranked per query")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", help="fp32 (default), bf16, auto")
    tuned = f"the --adapter's tuned budget (its {SAVED_RECIPE}), else"
    p.add_argument(
        "--max-document-tokens",
        type=int,
        metavar="N",
        help=f"a document is cut after N tokens (default: {tuned} "
        f"{_prompt_default('max_document_tokens')}); the value used is saved with the run",
    )
    p.add_argument(
        "--max-query-tokens",
        type=int,
        metavar="N",
        help=f"a conversation keeps its last N tokens (default: {tuned} "
        f"{_prompt_default('max_query_tokens')}); the value used is saved with the run",
    )
    p.add_argument("--no-kv-reuse", action="store_true", help="whole prompts in every batch")
    p.set_defaults(func=cmd_rerank)

    p = sub.add_parser(
        "esconv-tasks",
        help="write the ESConv strategy / response retrieval tasks (corpus, sessions, qrels)",
    )
    p.add_argument(
        "--split",
        help="the split file (default: the project's, shipped in the package: "
        "methods/rationale/esconv-split.json)",
    )
    p.add_argument(
        "--data-dir",
        help="ESConv data dir (default: the split file's data_dir, relative to the current "
        "directory; the shipped split's is ../shared/data/esconv)",
    )
    p.add_argument("--out", required=True, help="output dir: {strategy,response}/{train,eval}/")
    p.add_argument("--situation", action="store_true", help="prompts show the seeker's situation")
    p.add_argument(
        "--negatives", type=int, default=3, help="other strategies per training query (pairs)"
    )
    p.add_argument("--seed", type=int, default=0, help="negative sampling seed")
    p.set_defaults(func=cmd_esconv_tasks)

    p = sub.add_parser(
        "rerank-train",
        help="tune the binary-choice reranker (SFT or DPO, LoRA) from a recipe",
        description="Recipes: configs/rationale-sft.yaml, configs/rationale-dpo.yaml.",
    )
    p.add_argument("recipe", help="YAML recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output_dir from its newest checkpoint (same recipe only, up "
        "to its length and saving/logging steps)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output_dir that holds another run (its checkpoints are removed)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and stop")
    p.set_defaults(func=cmd_rerank_train)

    p = sub.add_parser(
        "rerank-distill",
        help="distill the (tuned) reranker into the Rabtriever bi-encoder student from a recipe",
        description="Recipe: configs/rationale-distill.yaml. The teacher's features are computed "
        "once into OUTPUT_DIR/features.safetensors: a rerun of the same recipe on the same data "
        "reuses them, any change to what they depend on recomputes them.",
    )
    p.add_argument("recipe", help="YAML recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and stop")
    p.set_defaults(func=cmd_rerank_distill)


def _prompt_default(name: str) -> int:
    """`BinaryChoicePrompt`'s default for the argument `name` (one place for the number)."""
    return default_budgets()[name]


def _echo(text: str) -> None:
    sys.stdout.write(text + "\n")


def cmd_rerank(args: argparse.Namespace) -> int:
    from chatretriever.io.corpus import iter_corpus
    from chatretriever.io.trec import read_run
    from chatretriever.methods.rationale.reranker import BinaryChoiceReranker
    from chatretriever.retrieval.search import save_run
    from chatretriever.types import passage_text

    for flag in ("k", "batch_size", "max_document_tokens", "max_query_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:  # None: not given
            raise ValueError(f"--{flag.replace('_', '-')} must be positive")
    sessions = load_sessions(args)
    documents = {p.id: passage_text(p) for p in iter_corpus(args.corpus)}
    run = read_run(args.run, known_queries={s.id for s in sessions}, known_docs=documents)
    if not run.scores:
        logger.warning("%s holds no queries: the reranked run will be empty", args.run)
    reranker = BinaryChoiceReranker.from_pretrained(
        args.model,
        adapter=args.adapter,
        wording=args.wording,
        dtype=args.dtype,
        batch_size=args.batch_size,
        max_document_tokens=args.max_document_tokens,
        max_query_tokens=args.max_query_tokens,
    )
    reuse = not args.no_kv_reuse
    out = reranker.rerank(run, documents, sessions, args.k, reuse_kv=reuse, show_progress=True)
    settings = {
        "command": "rerank",
        "first_stage": args.run,
        "corpus": args.corpus,
        "sessions": args.sessions,
        "model": args.model,
        "adapter": args.adapter,
        "wording": args.wording,
        "k": args.k,
        "kv_reuse": reuse,
        "dtype": args.dtype or "fp32",
        # the budgets the prompts were cut at (given, or the adapter's tuned ones, or defaults)
        "max_document_tokens": reranker.prompt.max_document_tokens,
        "max_query_tokens": reranker.prompt.max_query_tokens,
    }
    n = save_run(args.out, out, settings)
    _echo(f"reranked {len(out.scores)} queries ({n} lines) -> {args.out}")
    return 0


def cmd_esconv_tasks(args: argparse.Namespace) -> int:
    from chatretriever.io.training import write_training_examples
    from chatretriever.methods.rationale import tasks
    from chatretriever.methods.rationale.pairs import choice_pairs, write_pairs

    if args.negatives < 1:
        raise ValueError("--negatives must be positive")
    split = tasks.load_split(args.split or tasks.SHIPPED_SPLIT, args.data_dir)
    out = Path(args.out)
    for part in ("train", "eval"):
        sessions = tasks.task_sessions(tasks.split_dialogs(split, part), args.situation)
        tasks.write_task(
            out / "strategy" / part,
            tasks.strategy_passages(),
            sessions,
            tasks.strategy_qrels(sessions),
        )
        tasks.write_task(
            out / "response" / part,
            tasks.response_passages(sessions),
            sessions,
            tasks.response_qrels(sessions),
        )
        _echo(f"{part}: {len(sessions)} queries -> {out}/{{strategy,response}}/{part}")
        if part == "train":
            gold = {s.id: s.metadata["strategy_id"] for s in sessions}
            pairs = choice_pairs(
                sessions, tasks.strategy_passages(), gold, args.negatives, args.seed
            )
            n = write_pairs(out / "strategy" / part / "pairs.jsonl", pairs)
            _echo(f"{n} training pairs -> {out}/strategy/train/pairs.jsonl")
            n = tasks.write_contrastive(out / "strategy" / part / "contrastive.jsonl", sessions)
            _echo(f"{n} contrastive examples -> {out}/strategy/train/contrastive.jsonl")
            n = write_training_examples(
                out / "response" / part / "contrastive.jsonl",
                tasks.response_examples(sessions, seed=args.seed),
            )
            _echo(f"{n} contrastive examples -> {out}/response/train/contrastive.jsonl")
    return 0


def _recipe(args: argparse.Namespace, build: Callable[[dict[str, Any]], Any]) -> Any:
    """The recipe with its `--set` overrides; None when `--dry-run` printed it instead."""
    from chatretriever.modeling.recipe import load_config

    config = load_config(args.recipe, build, args.overrides)
    if args.dry_run:
        import yaml

        yaml.safe_dump(config.to_dict(), sys.stdout, sort_keys=False)
        return None
    return config


def cmd_rerank_train(args: argparse.Namespace) -> int:
    from chatretriever.methods.rationale.tuning import TuneConfig, run_dpo, run_sft

    config = _recipe(args, TuneConfig.from_dict)
    if config is None:
        return 0
    run = run_dpo if config.objective == "dpo" else run_sft
    _echo(f"saved {run(config, resume=args.resume, overwrite=args.overwrite)}")
    return 0


def cmd_rerank_distill(args: argparse.Namespace) -> int:
    from chatretriever.methods.rationale.distill_recipe import DistillConfig, run_distill

    config = _recipe(args, DistillConfig.from_dict)
    if config is None:
        return 0
    _echo(f"saved {run_distill(config)}")
    return 0
