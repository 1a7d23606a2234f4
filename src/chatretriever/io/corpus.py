"""BEIR corpus JSONL: one `{"_id", "title", "text", ...}` object per line."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.files import iter_jsonl, require, require_id, write_jsonl
from chatretriever.types import Passage

logger = logging.getLogger(__name__)

_CORE = ("_id", "id", "title", "text")


def iter_numbered_corpus(path: str | Path) -> Iterator[tuple[int, Passage]]:
    """Stream (1-based line number, passage) from a BEIR corpus file; see `iter_corpus`."""
    seen: set[str] = set()
    blank: list[tuple[int, str]] = []
    for lineno, obj in iter_jsonl(path):
        key = "_id" if "_id" in obj else "id" if "id" in obj else "_id"
        pid = require_id(obj, key, path, lineno)
        if pid in seen:
            raise DataFormatError(path, f"duplicate id {pid!r}", line=lineno, field=key)
        seen.add(pid)
        text = require(obj, "text", path, lineno)
        title = obj.get("title") or ""
        if not isinstance(title, str):
            raise DataFormatError(path, "expected str", line=lineno, field="title")
        if not text.strip() and not title.strip():
            blank.append((lineno, pid))
        meta = {k: v for k, v in obj.items() if k not in _CORE}
        yield lineno, Passage(id=pid, text=text, title=title, metadata=meta)
    if blank:
        lineno, pid = blank[0]
        logger.warning(
            "%s: %d passage(s) with neither text nor title (first: line %d, id %r): kept, "
            "but they can only match a query by chance",
            path,
            len(blank),
            lineno,
            pid,
        )


def iter_corpus(path: str | Path) -> Iterator[Passage]:
    """Stream passages from a BEIR corpus file (`.jsonl` or `.jsonl.gz`).

    Extra fields (e.g. `domain`) go to `Passage.metadata`. Duplicate ids raise.
    """
    for _, passage in iter_numbered_corpus(path):
        yield passage


def read_corpus(path: str | Path) -> list[Passage]:
    """Read a whole BEIR corpus file into a list (see `iter_corpus` to stream)."""
    return list(iter_corpus(path))


def passage_to_dict(p: Passage) -> dict[str, Any]:
    """A passage as one BEIR JSONL object (metadata fields at the top level)."""
    return {"_id": p.id, "title": p.title, "text": p.text, **dict(p.metadata)}


def write_corpus(path: str | Path, passages: Iterable[Passage]) -> int:
    """Write passages as BEIR JSONL atomically; returns the count."""
    return write_jsonl(path, (passage_to_dict(p) for p in passages))
