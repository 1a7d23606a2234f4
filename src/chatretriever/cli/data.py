"""`chatretriever data ...`: look at dataset files."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from chatretriever.io.conversations import SESSION_FORMATS, read_conversations
from chatretriever.io.stats import FORMATS, dataset_stats
from chatretriever.types import Session

logger = logging.getLogger(__name__)


def add_sessions_arguments(
    p: argparse.ArgumentParser, what: str = "", judged: bool = False
) -> None:
    """`--sessions FILE` (any conversation format, see `chatretriever.io.conversations`),
    `--sessions-format`, `--rewrite-field` and, when `judged`, `--judged QRELS`."""
    p.add_argument(
        "--sessions",
        required=True,
        help="conversations: sessions JSONL, or a dataset file as published (MTRAG "
        "reference.jsonl, TopiOCQA, QReCC, OR-QuAC, CANARD, TREC CAsT / iKAT topics, DSTC9-11 "
        "logs.json, ESConv, BEIR queries, qid<TAB>text)" + what,
    )
    p.add_argument(
        "--sessions-format",
        choices=SESSION_FORMATS,
        default=None,
        help="the format of --sessions (default: told from the file)",
    )
    p.add_argument(
        "--rewrite-field",
        default=None,
        metavar="KEY",
        help="take each session's rewrite from this metadata field instead (e.g. "
        "automatic_rewrite: the TREC CAsT organisers' automatic rewrites; dataset_rewrite "
        "after `chatretriever rewrite`)",
    )
    if judged:
        p.add_argument(
            "--judged",
            nargs="+",
            metavar="QRELS",
            help="only the sessions these qrels judge (files or directories, as `evaluate` "
            "takes them): a dataset judges a subset of its turns (DSTC11 val: 2,129 of 4,173)",
        )


def load_sessions(args: argparse.Namespace) -> list[Session]:
    """The sessions `add_sessions_arguments` named (rewrites from `--rewrite-field` if given)."""
    sessions = read_conversations(args.sessions, args.sessions_format)
    if getattr(args, "judged", None):
        sessions = judged_sessions(sessions, args.judged, args.sessions)
    key = getattr(args, "rewrite_field", None)
    return sessions if key is None else rewrites_from(sessions, key, args.sessions)


def judged_sessions(sessions: list[Session], qrels: list[str], where: str) -> list[Session]:
    """The sessions some judgment of `qrels` names (its grade may be 0), in their order.

    Raises:
        ValueError: None of them is judged (naming an id of each side).
    """
    from chatretriever.io.trec import read_qrels_files

    judged = {q.query_id for q in read_qrels_files(qrels)}
    kept = [s for s in sessions if s.id in judged]
    if not kept:
        raise ValueError(
            f"--judged {' '.join(qrels)}: judges none of the {len(sessions)} sessions of {where} "
            f"(session ids such as {sessions[0].id if sessions else None!r}, judged ids such as "
            f"{min(judged) if judged else None!r})"
        )
    logger.info("--judged: %d of %d sessions of %s are judged", len(kept), len(sessions), where)
    return kept


def rewrites_from(sessions: list[Session], key: str, where: str) -> list[Session]:
    """The sessions with `rewrite` = their metadata[key] (None where they have none).

    Raises:
        ValueError: no session has a text under `key` (the message lists the fields there are).
    """
    texts = [s.metadata.get(key) for s in sessions]
    if not any(isinstance(t, str) and t.strip() for t in texts):
        fields = sorted({k for s in sessions for k, v in s.metadata.items() if isinstance(v, str)})
        raise ValueError(
            f"{where}: no session has a text in metadata field {key!r} (--rewrite-field); "
            f"text fields there: {', '.join(fields) or 'none'}"
        )
    return [
        dataclasses.replace(s, rewrite=t.strip() if isinstance(t, str) and t.strip() else None)
        for s, t in zip(sessions, texts, strict=True)
    ]


def add_parser(sub: Any) -> None:
    """Register `data stats PATH`, `data convert PATH --out FILE`, `data corpus`, `data qrels`."""
    data = sub.add_parser("data", help="inspect and convert dataset files")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    convert = data_sub.add_parser(
        "convert",
        help="write a conversation dataset file as sessions JSONL (its format is guessed)",
        description="Reads any conversation file `--sessions` accepts (MTRAG reference.jsonl, "
        "TopiOCQA, TREC CAsT / iKAT topics, DSTC11 logs.json with its labels.json, ESConv, "
        "MultiESC) and writes one session per line: "
        '{"id", "messages": [{"role", "content"}], "rewrite"?, "response"?, ...metadata}.',
    )
    convert.add_argument("path", help="a conversation dataset file (.gz read transparently)")
    convert.add_argument("--out", required=True, help="sessions JSONL to write (.gz compresses)")
    convert.add_argument("--format", choices=SESSION_FORMATS, default=None, help="skip guessing")
    convert.set_defaults(func=run_convert)
    _add_collection_parsers(data_sub)
    stats = data_sub.add_parser(
        "stats", help="count what a dataset file holds (its format is guessed)"
    )
    stats.add_argument("path", help="a dataset file (.gz read transparently)")
    stats.add_argument("--format", choices=FORMATS, default=None, help="skip guessing")
    stats.add_argument("--no-progress", action="store_true", help="no progress bar")
    stats.set_defaults(func=run_stats)


def _cell(value: Any) -> str:
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.2f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def format_stats(stats: dict[str, Any]) -> str:
    """The counts as a two-column table; nested counts are indented under their name."""
    rows: list[tuple[str, str]] = []
    for key, value in stats.items():
        if isinstance(value, dict):
            rows.append((key, ""))
            rows.extend((f"  {k}", _cell(v)) for k, v in value.items())
        else:
            rows.append((key, _cell(value)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)


def run_stats(args: argparse.Namespace) -> int:
    """Print the counts of one file; bad input raises DataFormatError (exit 2 in `main`)."""
    stats = dataset_stats(args.path, args.format, show_progress=not args.no_progress)
    sys.stdout.write(format_stats(stats) + "\n")  # command output; logging goes to stderr
    return 0


def run_convert(args: argparse.Namespace) -> int:
    """Write the sessions of one conversation file as JSONL (atomically)."""
    from chatretriever.io.sessions import write_sessions

    sessions = read_conversations(args.path, args.format)
    n = write_sessions(args.out, sessions)
    write_settings(args, sessions=n)
    sys.stderr.write(f"{n} sessions -> {args.out}\n")
    return 0


def write_settings(args: argparse.Namespace, **found: Any) -> None:
    """Record how `args.out` was made beside it (`<out>.settings.json`, as runs do): the
    command's arguments (`format` None: told from the file), what `found` adds (the format
    told, the counts) and the version."""
    from chatretriever import __version__
    from chatretriever.io.atomic import atomic_write

    out = Path(args.out)
    given = {k: v for k, v in vars(args).items() if k != "func"}
    settings = {**given, **found, "chatretriever": __version__}
    with atomic_write(out.with_name(out.name + ".settings.json")) as f:
        json.dump(settings, f, indent=2)


def _add_collection_parsers(data_sub: Any) -> None:
    """`data corpus` and `data qrels`: a test collection from a dataset's own knowledge."""
    from chatretriever.io.grounded_dialogs import GRANULARITIES
    from chatretriever.io.grounding import KNOWLEDGE_FORMATS

    corpus = data_sub.add_parser(
        "corpus",
        help="write a dataset's knowledge as a BEIR corpus (DSTC9-11 knowledge.json, iKAT "
        "*_psg_text.jsonl, Doc2Dial/MultiDoc2Dial *_doc.json)",
    )
    corpus.add_argument("path", help="the knowledge file (.gz read transparently)")
    corpus.add_argument("--out", required=True, help="corpus JSONL to write (.gz compresses)")
    corpus.add_argument("--format", choices=KNOWLEDGE_FORMATS, default=None, help="skip guessing")
    corpus.add_argument(
        "--granularity",
        choices=GRANULARITIES,
        default=None,
        help="Doc2Dial documents: a passage per section (MultiDoc2Dial's retrieval unit, the "
        "default) or per document; other formats have one granularity",
    )
    corpus.set_defaults(func=run_corpus)
    qrels = data_sub.add_parser(
        "qrels",
        help="write the passages each session's answer is grounded in as TREC qrels (DSTC9-11 "
        "labels, iKAT citations, MTRAG contexts, CAsT provenance, Doc2Dial references)",
    )
    qrels.add_argument("path", help="a conversation dataset file, as `data convert` reads it")
    qrels.add_argument("--out", required=True, help="TREC qrels to write")
    qrels.add_argument("--format", choices=SESSION_FORMATS, default=None, help="skip guessing")
    qrels.add_argument(
        "--documents",
        default=None,
        metavar="DOC_JSON",
        help="Doc2Dial: the *_doc.json file; judges the sections holding the grounding spans "
        "(a corpus written with --granularity section); without it, whole documents",
    )
    qrels.set_defaults(func=run_qrels)


def run_corpus(args: argparse.Namespace) -> int:
    """Write a knowledge file's passages as BEIR JSONL (atomically); ids checked for TREC."""
    from chatretriever.io.corpus import write_corpus
    from chatretriever.io.files import check_id
    from chatretriever.io.grounding import knowledge_format, read_knowledge

    fmt = args.format or knowledge_format(args.path)
    if args.granularity is not None and fmt != "doc2dial-docs":
        logger.warning("%s: --granularity applies to Doc2Dial documents only, not to %s: ignored",
                       args.path, fmt)  # fmt: skip
    passages = read_knowledge(args.path, fmt, args.granularity or "section")
    if not passages:
        raise ValueError(f"{args.path}: holds no passages")
    for p in passages:
        check_id(p.id, args.path, None, "id")
    n = write_corpus(args.out, passages)
    granularity = (args.granularity or "section") if fmt == "doc2dial-docs" else None
    write_settings(args, format=fmt, granularity=granularity, passages=n)
    sys.stderr.write(f"{n} passages -> {args.out}\n")
    return 0


def run_qrels(args: argparse.Namespace) -> int:
    """Write the grounding judgments of a conversation file as TREC qrels (atomically)."""
    from chatretriever.io.files import check_id
    from chatretriever.io.grounded_dialogs import read_doc2dial_docs
    from chatretriever.io.grounding import grounding_qrels
    from chatretriever.io.trec import write_qrels

    sessions = read_conversations(args.path, args.format)
    documents = read_doc2dial_docs(args.documents) if args.documents else None
    qrels = grounding_qrels(sessions, documents)
    if not qrels:
        raise ValueError(
            f"{args.path}: no session records the passages it is grounded in (readers record "
            "them for DSTC9-11 with labels.json, iKAT, MTRAG reference.jsonl, CAsT 2022, "
            "Doc2Dial)"
        )
    for q in qrels:
        check_id(q.query_id, args.path, None, "session id")
        check_id(q.doc_id, args.path, None, f"grounding of {q.query_id}")
    n = write_qrels(args.out, qrels)
    judged = len({q.query_id for q in qrels})
    write_settings(args, judgments=n, judged_sessions=judged, sessions=len(sessions))
    sys.stderr.write(f"{n} judgments of {judged} of {len(sessions)} sessions -> {args.out}\n")
    return 0
