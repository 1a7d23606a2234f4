"""BEIR corpus JSONL: one `{"_id", "title", "text", ...}` object per line.

A tab-separated corpus is read too: `id<TAB>text` lines (MS MARCO's `collection.tsv`), or any
columns named by a header line holding `id` and `text` (DPR's `psgs_w100.tsv`: `id text title`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.files import iter_jsonl, iter_lines, require, require_id, write_jsonl
from chatretriever.types import Passage

logger = logging.getLogger(__name__)

_CORE = ("_id", "id", "title", "text")


# a TSV corpus header's names of its id and text columns, besides `id` and `text` themselves
# (BEIR's corpus-id, MS MARCO's pid / passage, Pyserini's contents, ...)
_ID_COLUMNS = ("docid", "doc_id", "pid", "passage_id", "corpus-id", "corpus_id", "document_id")
_TEXT_COLUMNS = ("passage", "passage_text", "contents", "content", "body", "doc_text")


def tsv_header(cols: list[str]) -> list[str] | None:
    """The column names of a TSV corpus's header line, else None.

    A header names an id column and a text column: `id` / `text`, or a common other name of
    each (`_ID_COLUMNS`, `_TEXT_COLUMNS`), read as `id` / `text` when the header has no column
    of that very name. Other columns keep their names (DPR's `title`).
    """
    named = [c.strip().lower().removeprefix("_") for c in cols]
    for canonical, others in (("id", _ID_COLUMNS), ("text", _TEXT_COLUMNS)):
        if canonical not in named:
            alias = next((n for n in named if n in others), None)
            if alias is None:
                return None
            named[named.index(alias)] = canonical
    return named


def _tsv_rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """A TSV corpus's lines as objects keyed by its header, or `id`, `text` without one."""
    columns: list[str] | None = None
    for lineno, line in iter_lines(path):
        cols = line.split("\t")
        if columns is None:
            columns = tsv_header(cols)
            if columns is not None:
                continue
            if len(cols) != 2:
                msg = (
                    f"a tab-separated corpus needs id<TAB>text lines or a header naming its "
                    f"columns (id, text, title), got {len(cols)} columns"
                )
                raise DataFormatError(path, msg, lineno)
            columns = ["id", "text"]
        if len(cols) != len(columns):
            msg = f"expected {len(columns)} tab-separated columns ({', '.join(columns)})"
            raise DataFormatError(path, f"{msg}, got {len(cols)}", lineno)
        yield lineno, dict(zip(columns, cols, strict=True))


def _rows(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """JSON lines, unless the first line is tab-separated text (then a TSV corpus)."""
    first = next((line for _, line in iter_lines(path)), "")
    tsv = "\t" in first and not first.lstrip().startswith("{")
    return _tsv_rows(path) if tsv else iter_jsonl(path)


def iter_numbered_corpus(path: str | Path) -> Iterator[tuple[int, Passage]]:
    """Stream (1-based line number, passage) from a BEIR corpus file; see `iter_corpus`.

    A file of another kind (sessions, qrels, DSTC knowledge, ...) is refused naming it
    (`kinds.first_line_error`), not by the first field its first line lacks.
    """
    try:
        yield from _numbered_passages(path)
    except DataFormatError as e:
        from chatretriever.io.kinds import CORPUS_KINDS, first_line_error

        raise first_line_error(path, e, "a corpus", CORPUS_KINDS) from None


def _numbered_passages(path: str | Path) -> Iterator[tuple[int, Passage]]:
    seen: set[str] = set()
    blank: list[tuple[int, str]] = []
    for lineno, obj in _rows(path):
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
    """Stream passages from a BEIR corpus file (`.jsonl` or `.jsonl.gz`; or TSV, module doc).

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
