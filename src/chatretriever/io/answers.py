"""Answers JSONL: one generated answer per turn, `{"qid", "answer", "passages": [docid, ...]}`.

`passages` lists the ids of the passages the answer was grounded on, best first (empty for a
closed-book answer). Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.files import iter_jsonl, require, write_jsonl


@dataclass(frozen=True)
class AnswerRow:
    """One line of an answers file.

    Attributes:
        qid: The turn (query) id, as in qrels and runs.
        answer: The generated answer.
        passages: Ids of the passages the answer was grounded on, best first.
    """

    qid: str
    answer: str
    passages: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {"qid": self.qid, "answer": self.answer, "passages": list(self.passages)}


def answer_row_from_dict(
    obj: Mapping[str, Any], path: str | Path = "<input>", line: int | None = None
) -> AnswerRow:
    """Parse one answers line; errors name the file, line and field."""
    qid = require(obj, "qid", path, line)
    if not qid:
        raise DataFormatError(path, "empty qid", line, "qid")
    answer = require(obj, "answer", path, line)
    raw = obj.get("passages", [])
    if not isinstance(raw, list):
        raise DataFormatError(path, f"expected list, got {type(raw).__name__}", line, "passages")
    passages = []
    for i, docid in enumerate(raw):
        if isinstance(docid, int) and not isinstance(docid, bool):
            docid = str(docid)  # numeric doc ids, as in BEIR files
        if not isinstance(docid, str) or not docid:
            raise DataFormatError(path, "expected a non-empty doc id", line, f"passages[{i}]")
        passages.append(docid)
    return AnswerRow(qid=qid, answer=answer, passages=tuple(passages))


def iter_answer_rows(path: str | Path) -> Iterator[AnswerRow]:
    """Stream the rows of an answers file (gzip transparent); a repeated qid raises."""
    seen: set[str] = set()
    for lineno, obj in iter_jsonl(path):
        row = answer_row_from_dict(obj, path, lineno)
        if row.qid in seen:
            raise DataFormatError(path, f"duplicate qid {row.qid!r}", line=lineno, field="qid")
        seen.add(row.qid)
        yield row


def read_answers(path: str | Path) -> dict[str, str]:
    """Read an answers file.

    Args:
        path: An answers JSONL file (`.gz` allowed).

    Returns:
        qid -> answer, in file order.
    """
    return {row.qid: row.answer for row in iter_answer_rows(path)}


def write_answers(path: str | Path, rows: Iterable[AnswerRow | Mapping[str, Any]]) -> int:
    """Write answers atomically (nothing changes at `path` if a row is bad).

    Args:
        path: The output file (`.gz` compresses).
        rows: AnswerRows or {"qid", "answer", "passages"?} dicts.

    Returns:
        The number of rows written.
    """

    def checked() -> Iterator[dict[str, Any]]:
        seen: set[str] = set()
        for i, row in enumerate(rows):
            if not isinstance(row, AnswerRow):
                row = answer_row_from_dict(row, "<rows>", i + 1)
            if row.qid in seen:
                raise ValueError(f"write_answers: duplicate qid {row.qid!r} (row {i + 1})")
            seen.add(row.qid)
            yield row.to_dict()

    return write_jsonl(path, checked())


def answer_rows(
    answers: Mapping[str, str], passages: Mapping[str, Sequence[str]] | None = None
) -> list[AnswerRow]:
    """AnswerRows from qid -> answer (and qid -> grounding doc ids, when known)."""
    passages = passages or {}
    return [AnswerRow(q, a, tuple(passages.get(q, ()))) for q, a in answers.items()]
