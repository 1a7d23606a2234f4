"""Read the item training examples `build.py` writes (the project's training JSONL, parsed by
`io.training`: one parser for the format).

Each line: {"id", "messages": [one user turn: the query], "positives": [{"id", "title", "text"}],
"negatives": [...], "source": "items/<TASK>", "metadata": {"task", "relevant": [all target ids],
...}}. Only what item training needs is kept: the query, the item ids and texts, and the ids of
every relevant item (never scored as a negative of that query).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from chatretriever.errors import DataFormatError
from chatretriever.io.files import iter_jsonl
from chatretriever.io.training import TrainingPassage, example_from_dict


@dataclass(frozen=True)
class ItemExample:
    """One training query: (id, text) of its positives and negatives, all relevant ids."""

    id: str
    query: str
    positives: tuple[tuple[str, str], ...]
    negatives: tuple[tuple[str, str], ...]
    relevant: tuple[str, ...]
    task: str = ""


def _ids(passages: tuple[TrainingPassage, ...], path: Path, line: int, key: str) -> tuple:
    """(id, text) of each item; an item without an id cannot be scored by id."""
    for j, p in enumerate(passages):
        if p.id is None:
            raise DataFormatError(path, "missing field", line, f"{key}[{j}].id")
    return tuple((str(p.id), p.text) for p in passages)


def iter_item_examples(path: str | Path) -> Iterator[ItemExample]:
    """Stream training examples (parsed by the shared format, `io.training`); an example
    without a positive, an item without an id or a bad field raises DataFormatError naming the
    file, line and field."""
    path = Path(path)
    for line, obj in iter_jsonl(path):
        ex = example_from_dict(obj, path, line)
        positives = _ids(ex.positives, path, line, "positives")
        relevant = ex.metadata.get("relevant") or [i for i, _ in positives]
        if not isinstance(relevant, list):
            raise DataFormatError(path, "expected a list of ids", line, "metadata.relevant")
        yield ItemExample(
            id=ex.id,
            query=ex.messages[-1].content,
            positives=positives,
            negatives=_ids(ex.negatives, path, line, "negatives"),
            relevant=tuple(str(i) for i in relevant),
            task=str(ex.metadata.get("task", "")),
        )
