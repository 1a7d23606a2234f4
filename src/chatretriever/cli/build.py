"""`chatretriever build-train SOURCE PATH... --out FILE`: make a CSIT training JSONL file."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any, NamedTuple

from chatretriever.errors import DataFormatError
from chatretriever.io.atomic import atomic_write
from chatretriever.io.corpus import iter_corpus
from chatretriever.io.sessions import write_sessions
from chatretriever.io.training import TrainingExample, write_training_examples
from chatretriever.retrieval.training_data.builders import (
    POSITIVES,
    cast_examples,
    conversation_id,
    drop_same_entity_negatives,
    dstc11_examples,
    examples_from_responses,
    first_question,
    ikat_examples,
    mtrag_examples,
    qrecc_examples,
    read_chat_examples,
    read_id_list,
    read_triples,
    split_heldout,
    topiocqa_examples,
)
from chatretriever.retrieval.training_data.negatives import (
    MINING_QUERIES,
    MiningConfig,
    mine_hard_negatives,
    mine_hard_negatives_by_domain,
)
from chatretriever.retrieval.training_data.teacher import add_teacher_scores
from chatretriever.types import Passage, Session

logger = logging.getLogger(__name__)

SOURCES = (
    "mtrag",
    "topiocqa",
    "qrecc",
    "cast",
    "ikat",
    "dstc11",
    "synthetic",
    "sessions",
    "triples",
)
_HOLDOUT_KEYS: dict[str, Callable[[Any], str]] = {
    "conversation": conversation_id,
    "first_question": first_question,
}


def add_parser(sub: Any) -> None:
    """Register `build-train SOURCE PATH [PATH ...] --out FILE [options]`."""
    p = sub.add_parser(
        "build-train",
        help="build a training JSONL file from a dataset (with BM25 hard negatives)",
        description="SOURCE and its PATHs: mtrag DIR (the mtrag/ directory); topiocqa FILE...; "
        "qrecc FILE...; cast DIR (trec-cast/, see --years); ikat DIR (ikat-2023/); "
        "dstc11 DIR (dstc11-track5/); "
        "synthetic CORPUS (a chat LLM writes a question per passage, see --n); sessions FILE... "
        "(sessions JSONL, each with a response or a final assistant turn); triples FILE... "
        "(TSV query, positive, negative).",
    )
    p.add_argument("source", choices=SOURCES)
    p.add_argument("paths", nargs="+", help="dataset directory or files")
    p.add_argument("--out", required=True, help="training JSONL to write (.gz compresses)")
    p.add_argument("--domains", nargs="+", default=None, help="mtrag: domains to use")
    p.add_argument(
        "--years",
        nargs="+",
        type=int,
        default=None,
        help="cast: years (default 2021 2022); ikat: years (default 2023)",
    )
    p.add_argument(
        "--splits",
        nargs="+",
        default=None,
        help="ikat: train test (default: those present); dstc11: val",
    )
    p.add_argument(
        "--positives",
        choices=POSITIVES,
        default="passages",
        help="mtrag, ikat, dstc11: judged/cited passages or the reference answers as positives",
    )
    syn = p.add_argument_group("synthetic pairs (source synthetic)")
    syn.add_argument("--n", type=int, default=1000, help="pairs to keep")
    syn.add_argument("--model", default="smollm2-135m-instruct", help="chat LLM writing questions")
    syn.add_argument("--cache", help="question cache JSONL (default: <out>.questions.jsonl)")
    syn.add_argument("--top-k", type=int, default=20, help="keep if the passage is in BM25's top k")
    syn.add_argument("--generate-batch-size", type=int, default=8)
    t = p.add_argument_group("teacher scores (for the distillation loss)")
    t.add_argument("--teacher", help="score positives and negatives with this encoder")
    t.add_argument("--teacher-batch-size", type=int, default=64)
    t.add_argument(
        "--sample",
        type=int,
        default=None,
        metavar="N",
        help="keep N examples after mining (before scoring): the ones a recipe's data.caps of N "
        "keeps with cap_seed --sample-seed, so a capped source is scored only where it is used",
    )
    t.add_argument("--sample-seed", type=int, default=0, help="the recipe's data.cap_seed")
    g = p.add_argument_group("hard negatives")
    g.add_argument(
        "--corpus",
        default=None,
        help="BEIR corpus to mine from (mtrag: its own; "
        "otherwise default: the pool of all positives)",
    )
    g.add_argument("--negatives", type=int, default=4, help="negatives per example (0: none)")
    g.add_argument("--rank-window", nargs=2, type=int, default=[15, 30], metavar=("FIRST", "LAST"))
    g.add_argument("--mining-query", choices=MINING_QUERIES, default="user_turns")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    h = p.add_argument_group("held-out conversations (never trained on)")
    h.add_argument("--holdout-ids", default=None, help="file of conversation ids, one a line")
    h.add_argument("--holdout-fraction", type=float, default=0.0)
    h.add_argument(
        "--holdout-key",
        choices=tuple(_HOLDOUT_KEYS),
        default="conversation",
        help="what the fraction hashes (first_question also groups seed siblings)",
    )
    h.add_argument("--holdout-seed", type=int, default=0)
    h.add_argument("--heldout-out", default=None, help="write held-out conversation ids here")
    h.add_argument("--eval-sessions-out", default=None, help="write held-out sessions here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_build_train)


class _Source(NamedTuple):
    items: list[Any]  # sessions (or, for example files, examples) to split
    build: Callable[[list[Any]], list[TrainingExample]]
    mine: Callable[[list[TrainingExample], MiningConfig, bool], list[TrainingExample]]
    mining_corpus: str


def _load(args: argparse.Namespace) -> _Source:
    """The chosen source's items, how to build and how to mine its examples."""
    src, paths = args.source, args.paths
    if src in ("mtrag", "cast", "ikat", "dstc11", "synthetic") and len(paths) != 1:
        raise ValueError(f"{src} takes one directory or corpus, got {len(paths)} paths")
    if src in ("ikat", "dstc11", "synthetic"):
        return _load_new(args)
    if src == "mtrag":
        from chatretriever.io.mtrag import iter_mtrag_corpus, load_mtrag

        data = load_mtrag(paths[0], args.domains)
        corpus_path = args.corpus or data.corpus_path
        if corpus_path is None:
            raise ValueError("no MTRAG corpus found: pass --corpus")
        corpus = list(iter_mtrag_corpus(corpus_path, args.domains))
        by_id = {p.id: p for p in corpus}

        def build(ss: list[Session]) -> list[TrainingExample]:
            if args.positives == "answers":
                return examples_from_responses(ss, "mtrag", skip=["UNANSWERABLE"])
            return mtrag_examples(ss, data.qrels, by_id)

        return _Source(
            data.sessions,
            build,
            lambda ex, cfg, bar: mine_hard_negatives_by_domain(ex, corpus, cfg, bar),
            f"{corpus_path} (per domain)",
        )
    mining = list(iter_corpus(args.corpus)) if args.corpus else None

    def mine(ex: list[TrainingExample], cfg: MiningConfig, bar: bool) -> list[TrainingExample]:
        return mine_hard_negatives(ex, mining, cfg, bar)

    name = str(args.corpus) if args.corpus else "all positives"
    if src in ("topiocqa", "qrecc"):
        from chatretriever.io.topiocqa import read_topiocqa

        build = topiocqa_examples if src == "topiocqa" else qrecc_examples
        return _Source([s for p in paths for s in read_topiocqa(p)], build, mine, name)
    if src == "cast":
        from chatretriever.io.cast import load_cast

        sessions = [s for y in args.years or (2021, 2022) for s in load_cast(paths[0], y).sessions]
        return _Source(sessions, cast_examples, mine, name)
    if src == "sessions":  # ids unique over all the files (each names its file and line)
        seen: dict[str, str] = {}
        examples = [ex for p in paths for ex in read_chat_examples(p, seen=seen)]
    else:
        examples = [ex for p in paths for ex in read_triples(p)]
    return _Source(examples, list, mine, name)


def _mine_over(passages: list[Passage], name: str) -> tuple[Callable[..., Any], str]:
    def mine(ex: list[TrainingExample], cfg: MiningConfig, bar: bool) -> list[TrainingExample]:
        return mine_hard_negatives(ex, passages, cfg, bar)

    return mine, name


def _load_new(args: argparse.Namespace) -> _Source:
    """iKAT, DSTC11 and synthetic pairs: their own passages are the mining corpus (unless
    --corpus names another)."""
    path = args.paths[0]
    if args.source == "synthetic":
        from chatretriever.io.corpus import read_corpus

        own = read_corpus(path)
        examples = _synthetic(args, own)
        corpus = list(iter_corpus(args.corpus)) if args.corpus else own
        return _Source(examples, list, *_mine_over(corpus, str(args.corpus or path)))
    if args.source == "ikat":
        from chatretriever.io.ikat import load_ikat

        need = args.positives != "answers"
        data = load_ikat(path, args.splits, args.years or (2023,), need_passages=need)
        passages, build = data.passages, ikat_examples
    else:
        from chatretriever.io.dstc11 import load_dstc11

        splits = args.splits or ["val"]
        if len(splits) != 1:
            raise ValueError(f"dstc11 reads one split (logs and labels), got {splits}")
        split = splits[0]
        data = load_dstc11(path, split)
        passages, build = data.snippets, dstc11_examples
    if args.corpus or passages:
        corpus = list(iter_corpus(args.corpus)) if args.corpus else list(passages.values())
        mine, name = _mine_over(corpus, str(args.corpus or f"{args.source} passages"))
    else:  # iKAT 2024/2025 answers: no passages published, mine among the positives

        def mine(ex: list[TrainingExample], cfg: MiningConfig, bar: bool) -> list:
            return mine_hard_negatives(ex, None, cfg, bar)

        name = "all positives"

    def make(ss: list[Session]) -> list[TrainingExample]:
        return build(ss, passages, args.positives)

    if args.source == "dstc11":  # mine 3x, then drop negatives about the positives' entity
        name += " (other entities)"

        def mine_other(ex: list[TrainingExample], cfg: MiningConfig, bar: bool) -> list:
            wide = mine(ex, replace(cfg, num_negatives=3 * cfg.num_negatives), bar)
            return drop_same_entity_negatives(wide, cfg.num_negatives)

        return _Source(data.sessions, make, mine_other, name)
    return _Source(data.sessions, make, mine, name)


def _synthetic(args: argparse.Namespace, corpus: list[Passage]) -> list[TrainingExample]:
    from chatretriever.modeling.fingerprint import model_fingerprint
    from chatretriever.retrieval.training_data.synthetic import (
        SyntheticConfig,
        hf_batch_generator,
        synthetic_examples,
    )

    config = SyntheticConfig(
        n=args.n,
        model=args.model,
        model_fingerprint=model_fingerprint(args.model),  # a model retrained in place: new keys
        seed=args.seed,
        top_k=args.top_k,
        batch_size=args.generate_batch_size,
    )
    cache = args.cache or f"{args.out}.questions.jsonl"
    loaded: list[Any] = []

    def generate(chats: list[list[dict[str, str]]]) -> list[str]:
        if not loaded:  # an all-cached rerun loads no model
            loaded.append(hf_batch_generator(args.model))
        return loaded[0](chats)

    return synthetic_examples(
        corpus,
        generate,
        config,
        cache,
        show_progress=not args.no_progress,
        corpus_name=args.paths[0],
    )


def _write_heldout(args: argparse.Namespace, held: list[Any]) -> None:
    if args.heldout_out:
        ids = sorted({conversation_id(s) for s in held})
        with atomic_write(args.heldout_out) as f:
            f.write("".join(f"{i}\n" for i in ids))
    if args.eval_sessions_out:
        sessions = [s if isinstance(s, Session) else s.session() for s in held]
        write_sessions(args.eval_sessions_out, sessions)


def _check_holdout_ids(path: str | None, ids: set[str], items: list[Any]) -> None:
    """Held-out ids that name no conversation would leak the conversations meant to be held
    out into training: none matching is an error, some not matching a warning."""
    if not ids:
        return
    known = {conversation_id(it) for it in items}
    missing = sorted(ids - known)
    if len(missing) == len(ids):
        example = next(iter(sorted(known)), "none")
        raise DataFormatError(
            str(path),
            f"none of its {len(ids)} ids names a conversation here (first: {missing[0]!r}; "
            f"the conversation ids look like {example!r}): nothing would be held out",
        )
    if missing:
        logger.warning(
            "%s: %d of %d ids name no conversation here (first: %r)",
            path,
            len(missing),
            len(ids),
            missing[0],
        )


def run_build_train(args: argparse.Namespace) -> int:
    """Load, hold out, build, mine and write; prints one summary line."""
    start = time.perf_counter()
    if args.positives != "passages" and args.source not in ("mtrag", "ikat", "dstc11"):
        raise ValueError(
            f"--positives {args.positives}: only mtrag, ikat and dstc11 have passages and "
            f"answers to choose from ({args.source}'s positives are what it has)"
        )
    mining = MiningConfig(args.negatives, tuple(args.rank_window), args.seed, args.mining_query)
    source = _load(args)
    heldout_ids = read_id_list(args.holdout_ids) if args.holdout_ids else set()
    _check_holdout_ids(args.holdout_ids, heldout_ids, source.items)
    train, held = split_heldout(
        source.items,
        heldout_ids,
        args.holdout_fraction,
        args.holdout_seed,
        _HOLDOUT_KEYS[args.holdout_key],
    )
    examples = source.build(train)
    if not examples:
        raise ValueError(f"{args.source}: no training examples with a positive")
    if mining.num_negatives:
        examples = source.mine(examples, mining, not args.no_progress)
    if args.sample is not None:
        if args.sample < 1:
            raise ValueError(f"--sample must be at least 1, got {args.sample}")
        from chatretriever.modeling.recipe_data import hash_sample

        kept = {ex.id for ex in hash_sample(examples, args.sample, args.sample_seed)}
        examples = [ex for ex in examples if ex.id in kept]  # in the file's order
    if args.teacher:  # after mining: the scores cover the final negatives
        from chatretriever.apps.registry import load_encoder

        teacher = load_encoder(args.teacher)
        examples = add_teacher_scores(
            examples, teacher, args.teacher_batch_size, not args.no_progress
        )
    n = write_training_examples(args.out, examples)
    _write_heldout(args, held)
    summary = {
        "source": args.source,
        "paths": args.paths,
        "examples": n,
        "negatives": sum(len(e.negatives) for e in examples),
        "heldout_items": len(held),
        "heldout_conversations": len({conversation_id(s) for s in held}),
        "train_conversations": len({conversation_id(s) for s in train}),
        "mining": asdict(mining),
        "mining_corpus": source.mining_corpus,
        "positives": args.positives,
        "teacher": examples[0].teacher.model if args.teacher else None,
        "sample": None if args.sample is None else {"n": args.sample, "seed": args.sample_seed},
        "holdout": {k: getattr(args, f"holdout_{k}") for k in ("ids", "fraction", "key", "seed")},
        "seconds": round(time.perf_counter() - start, 1),
    }
    with atomic_write(f"{args.out}.meta.json") as f:  # the resolved settings beside the output
        json.dump(summary, f, indent=2)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0
