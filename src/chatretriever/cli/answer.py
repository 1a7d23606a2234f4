"""`chatretriever answer`: retrieve passages for sessions and write grounded answers (JSONL).

The index's model answers when it can (a UniConv retrieves and answers with one LLM); any other
retriever needs `--generator NAME`, a chat LLM that answers from the retrieved passages.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from chatretriever.cli.data import add_sessions_arguments, load_sessions

logger = logging.getLogger(__name__)

DEFAULT_GENERATOR_HINT = "smollm2-135m-instruct"


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `answer`."""
    p = sub.add_parser(
        "answer",
        help="retrieve the top k passages of each session and write a grounded answer (JSONL)",
        description="Retrieves with the index's model and answers from the top k passages: "
        "with the index's own model when it is a UniConv, else with --generator (a chat LLM). "
        'Writes one line per session: {"qid", "answer", "passages": [ids]}, and the settings '
        "beside it (OUT.settings.json, with the generation budgets and how many prompts were "
        "cut to fit them).",
    )
    add_sessions_arguments(p, judged=True)
    p.add_argument("--out", required=True, help="answers JSONL to write")
    p.add_argument("--index", help="index dir (from `index CORPUS --out DIR`)")
    p.add_argument("--model", help="query encoder (default: the model the index records)")
    p.add_argument("--corpus", help="corpus with the passage texts (default: the index's copy)")
    p.add_argument("--k", type=int, default=3, help="passages each answer reads")
    add_answer_arguments(p)
    p.add_argument("--batch-size", type=int, default=8, help="sessions per model call")
    p.add_argument(
        "--closed-book",
        action="store_true",
        help="answer without passages (no retrieval; --index only names a UniConv to answer)",
    )
    p.set_defaults(func=cmd_answer)


def add_answer_arguments(p: argparse.ArgumentParser) -> None:
    """`--generator` and `--max-new-tokens` (answer, chat --answer)."""
    p.add_argument(
        "--generator",
        metavar="NAME",
        help="chat LLM that answers from the passages (built-in name or dir, e.g. "
        f"{DEFAULT_GENERATOR_HINT}); default: the index's model, when it is a UniConv",
    )
    p.add_argument("--max-new-tokens", type=int, default=96, help="longest answer, in tokens")


def _echo(text: str) -> None:
    """Command output goes to stdout (logging and progress bars go to stderr)."""
    sys.stdout.write(text + "\n")


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise ValueError(f"{flag} must be positive, got {value}")
    return value


def load_generator(name: str, max_new_tokens: int, batch_size: int) -> Any:
    """A `GroundedGenerator` over the chat LLM `name` (tests replace this function)."""
    from chatretriever.modeling.grounded import GroundedGenerator

    return GroundedGenerator.from_pretrained(
        name, max_new_tokens=max_new_tokens, batch_size=batch_size
    )


def resolve_answerer(encoder: Any, generator: str | None, max_new_tokens: int, batch_size: int):
    """The model that answers: `--generator` when given, else the encoder when it answers too.

    Args:
        encoder: The retriever (None when nothing retrieves: closed book without an index).
        generator: `--generator NAME`, or None.
        max_new_tokens: Longest answer (the generator's setting; a UniConv gets it per call).
        batch_size: Prompts per generation call.

    Returns:
        (answering model, its name, keyword arguments for its `answer_batch`).
    """
    if generator:
        return load_generator(generator, max_new_tokens, batch_size), generator, {}
    if encoder is not None and hasattr(encoder, "answer_batch"):
        from chatretriever.apps.chat import generation_kwargs

        kwargs = generation_kwargs(encoder, max_new_tokens, batch_size)
        if "max_new_tokens" not in kwargs:
            logger.warning(
                "%s sets its own answer length: --max-new-tokens is ignored", encoder.name
            )
        return encoder, encoder.name, kwargs
    what = f"the index's model {encoder.name!r}" if encoder is not None else "nothing"
    raise ValueError(
        f"{what} does not write answers (only a UniConv retrieves and answers): pass "
        f"--generator NAME, a chat LLM such as {DEFAULT_GENERATOR_HINT}"
    )


def _retrieve(
    args: argparse.Namespace, sessions: list, corpus_index: Any, encoder: Any, batch_size: int
) -> dict:
    """Session id -> its top k passages (`search.search_dense` over the whole session)."""
    from chatretriever.apps.chat import top_passages
    from chatretriever.retrieval.search import search_dense

    if corpus_index.passages is None:
        raise ValueError(f"{args.index} holds no passage texts to answer from: pass --corpus")
    run = search_dense(encoder, corpus_index.index, sessions, k=args.k, batch_size=batch_size)
    return top_passages(run, corpus_index.passages, args.k)


def _load_retriever(args: argparse.Namespace) -> tuple[Any, Any]:
    """(corpus index, encoder) of `--index`; (None, None) when nothing retrieves or answers
    with the index's model (closed book with --generator)."""
    from chatretriever.apps.registry import load_encoder, match_precision, query_model
    from chatretriever.retrieval.corpus_index import CorpusIndex

    if args.closed_book and args.generator:
        return None, None
    if not args.index:
        raise ValueError("give --index DIR (only --closed-book with --generator needs none)")
    corpus_index = CorpusIndex.load(
        args.index, corpus=args.corpus, with_passages=not args.closed_book
    )
    model = query_model(args.model, corpus_index, args.index)
    encoder = load_encoder(model)
    match_precision(encoder, corpus_index.index.meta.fingerprint)  # the passages' precision
    return corpus_index, encoder


def _answer_report(answerer: Any) -> dict[str, Any] | None:
    """The budgets the answers were generated under (the prompt budget as the model's context
    allowed it) and how many prompts were cut to fit it; None for a model that does not say."""
    report = getattr(answerer, "answer_report", None)
    return report() if callable(report) else None


def cmd_answer(args: argparse.Namespace) -> int:
    from chatretriever.apps.chat import answer_sessions
    from chatretriever.io.answers import write_answers
    from chatretriever.io.atomic import atomic_write

    _positive(args.k, "--k")
    _positive(args.max_new_tokens, "--max-new-tokens")
    batch_size = _positive(args.batch_size, "--batch-size")
    sessions = load_sessions(args)
    corpus_index, encoder = _load_retriever(args)
    answerer, name, kwargs = resolve_answerer(
        encoder, args.generator, args.max_new_tokens, batch_size
    )
    if args.closed_book:
        passages: dict = {s.id: [] for s in sessions}
    else:
        passages = _retrieve(args, sessions, corpus_index, encoder, batch_size)
    items = [(s, passages[s.id]) for s in sessions]
    read = max((len(ps) for _, ps in items), default=0)  # fewer than --k: a small index
    if not args.closed_book and read < args.k:
        logger.warning("--k %d: the index holds fewer passages, each answer read at most %d",
                       args.k, read)  # fmt: skip
    answers = answer_sessions(answerer, items, batch_size, True, kwargs)
    rows = [
        {"qid": s.id, "answer": a, "passages": [p.id for p in ps]}
        for (s, ps), a in zip(items, answers, strict=True)
    ]
    write_answers(args.out, rows)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    settings.update(
        retriever=getattr(encoder, "name", None),
        answerer=name,
        sessions_count=len(sessions),
        passages_read=None if args.closed_book else read,  # the most any answer read
        generation=_answer_report(answerer),
    )
    out = Path(args.out)
    with atomic_write(out.with_name(out.name + ".settings.json")) as f:
        json.dump(settings, f, indent=2, default=str)
    how = "closed book" if args.closed_book else f"top {args.k} passages"
    if not args.closed_book and read < args.k:
        how = f"top {read} passages: the index holds fewer than --k {args.k}"
    _echo(f"{len(rows)} answers by {name} ({how}) -> {args.out}")
    return 0
