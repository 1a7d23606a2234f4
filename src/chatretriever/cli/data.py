"""`chatretriever data ...`: look at dataset files."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from chatretriever.io.stats import FORMATS, dataset_stats


def add_parser(sub: Any) -> None:
    """Register `data stats PATH [--format NAME]`."""
    data = sub.add_parser("data", help="inspect dataset files")
    data_sub = data.add_subparsers(dest="data_command", required=True)
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
