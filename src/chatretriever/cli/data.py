"""`chatretriever data ...`: look at dataset files."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from chatretriever.io.conversations import SESSION_FORMATS, read_conversations
from chatretriever.io.stats import FORMATS, dataset_stats
from chatretriever.types import Session


def add_sessions_arguments(p: argparse.ArgumentParser, what: str = "") -> None:
    """`--sessions FILE` (any conversation format, see `chatretriever.io.conversations`) and
    `--sessions-format`."""
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


def load_sessions(args: argparse.Namespace) -> list[Session]:
    """The sessions `add_sessions_arguments` named (rewrites from `--rewrite-field` if given)."""
    sessions = read_conversations(args.sessions, args.sessions_format)
    key = getattr(args, "rewrite_field", None)
    return sessions if key is None else rewrites_from(sessions, key, args.sessions)


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
    """Register `data stats PATH [--format NAME]` and `data convert PATH --out FILE`."""
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
    sys.stderr.write(f"{n} sessions -> {args.out}\n")
    return 0
