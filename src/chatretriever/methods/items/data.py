"""Read the item training examples `build.py` writes (the project's training JSONL).

Each line: {"id", "messages": [one user turn: the query], "positives": [{"id", "title", "text"}],
"negatives": [...], "source": "items/<TASK>", "metadata": {"task", "relevant": [all target ids],
...}}. Only what item training needs is kept: the query, the item ids and texts, and the ids of
every relevant item (never scored as a negative of that query).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.files import iter_jsonl, require
from chatretriever.io.sessions import parse_messages


@dataclass(frozen=True)
class ItemExample:
    """One training query: (id, text) of its positives and negatives, all relevant ids."""

    id: str
    query: str
    positives: tuple[tuple[str, str], ...]
    negatives: tuple[tuple[str, str], ...]
    relevant: tuple[str, ...]
    task: str = ""


def _items(obj: dict[str, Any], key: str, path: Path, line: int) -> tuple[tuple[str, str], ...]:
    raw = obj.get(key, [])
    if not isinstance(raw, list):
        raise DataFormatError(path, "expected a list of items", line, key)
    out = []
    for j, p in enumerate(raw):
        if not isinstance(p, dict):
            raise DataFormatError(path, "expected an object", line, f"{key}[{j}]")
        out.append(
            (require(p, "id", path, line), require(p, "text", path, line))
        )  # ids identify items
    return tuple(out)


def iter_item_examples(path: str | Path) -> Iterator[ItemExample]:
    """Stream training examples; an example without a positive or with a bad field raises
    DataFormatError naming the file, line and field."""
    path = Path(path)
    for line, obj in iter_jsonl(path):
        qid = require(obj, "id", path, line)
        turns = parse_messages(obj.get("messages"), path, line)
        positives = _items(obj, "positives", path, line)
        if not positives:
            raise DataFormatError(path, "needs at least one positive", line, "positives")
        meta = obj.get("metadata") or {}
        relevant = meta.get("relevant") or [i for i, _ in positives]
        if not isinstance(relevant, list):
            raise DataFormatError(path, "expected a list of ids", line, "metadata.relevant")
        yield ItemExample(
            id=qid,
            query=turns[-1].content,
            positives=positives,
            negatives=_items(obj, "negatives", path, line),
            relevant=tuple(str(i) for i in relevant),
            task=str(meta.get("task", "")),
        )
