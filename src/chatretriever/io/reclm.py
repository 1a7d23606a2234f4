"""RecLM-emb item data: item metadata JSONL and `sequential_data.txt` user histories.

- Items (`metadata.jsonl[.gz]`): one object per line with `item_id`, `title` and free fields
  (Steam: `tags, genres, game_details, developer, publisher, price, release_date, sentiment,
  early_access`). An item's `Passage.id` is its 1-based row number, the id the histories use;
  the dataset's own `item_id` stays in the metadata.
- Histories (`sequential_data.txt`): `user_id item item ...` per line, items in time order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.files import iter_jsonl, iter_lines, require
from chatretriever.types import Passage


@dataclass(frozen=True)
class UserHistory:
    """One user's interactions: item row ids (strings, 1-based) oldest first."""

    user_id: str
    items: tuple[str, ...]


def _label(key: str) -> str:
    return key.replace("_", " ").capitalize()


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value if v not in (None, ""))
    return str(value).strip()


def item_text(obj: Mapping[str, Any]) -> str:
    """A readable text of an item record: `Title: ...` then one `Field: value` line per field.

    Empty and null fields are left out; lists are joined with commas; booleans read yes/no.
    """
    lines = [f"Title: {_value(obj.get('title', ''))}"]
    for key, value in obj.items():
        if key in ("item_id", "title") or value is None:
            continue
        text = _value(value)
        if text:
            lines.append(f"{_label(key)}: {text}")
    return "\n".join(lines)


def iter_reclm_items(path: str | Path) -> Iterator[Passage]:
    """Stream items as passages: id = 1-based row number, text from `item_text`.

    Every record needs `item_id` and a non-empty `title`; a repeated `item_id` raises.
    """
    seen: set[str] = set()
    for row, (lineno, obj) in enumerate(iter_jsonl(path), start=1):
        item_id = require(obj, "item_id", path, lineno)
        title = require(obj, "title", path, lineno)
        if not title.strip():  # NM2I misspells it, every query and reply names an item by it
            raise DataFormatError(path, "empty title", lineno, "title")
        if item_id in seen:
            raise DataFormatError(path, f"duplicate id {item_id!r}", lineno, "item_id")
        seen.add(item_id)
        if row != lineno:  # ids are row numbers: a skipped blank line would shift them all
            raise DataFormatError(path, "a blank line comes before this item", lineno)
        meta = {k: v for k, v in obj.items() if k != "title"}
        yield Passage(id=str(row), text=item_text(obj), title=title, metadata=meta)


def read_reclm_items(path: str | Path) -> list[Passage]:
    """All items of a RecLM-emb metadata file (see `iter_reclm_items`)."""
    return list(iter_reclm_items(path))


def iter_reclm_sequences(path: str | Path, n_items: int | None = None) -> Iterator[UserHistory]:
    """Stream user histories from `sequential_data.txt`.

    Args:
        path: The file (`user_id item item ...` per line, whitespace separated).
        n_items: When given, every item must be a row of the item file (1..n_items).

    Returns:
        An iterator of UserHistory; a repeated user id raises.
    """
    seen: set[str] = set()
    for lineno, line in iter_lines(path):
        cols = line.split()
        if len(cols) < 2:
            raise DataFormatError(path, "expected a user id and at least one item", lineno)
        user, items = cols[0], cols[1:]
        if user in seen:
            raise DataFormatError(path, f"duplicate id {user!r}", lineno, "user_id")
        seen.add(user)
        for j, item in enumerate(items, start=1):
            if not item.isdigit() or int(item) < 1:
                msg = f"expected a 1-based item row, got {item!r}"
                raise DataFormatError(path, msg, lineno, f"item[{j}]")
            if n_items is not None and int(item) > n_items:
                msg = f"item {item} names no item (the item file has {n_items})"
                raise DataFormatError(path, msg, lineno, f"item[{j}]")
        yield UserHistory(user_id=user, items=tuple(str(int(i)) for i in items))


def read_reclm_sequences(path: str | Path, n_items: int | None = None) -> list[UserHistory]:
    """All user histories (see `iter_reclm_sequences`)."""
    return list(iter_reclm_sequences(path, n_items))


@dataclass(frozen=True)
class RecLMData:
    """A RecLM-emb domain: items (ids = row numbers) and user histories over them.

    Attributes:
        items: The items.
        histories: The users' histories.
        histories_file: Where the histories were read (or looked for); None: built in memory.
    """

    items: list[Passage]
    histories: list[UserHistory]
    histories_file: Path | None = None


def load_reclm(root: str | Path) -> RecLMData:
    """Load `metadata.jsonl[.gz]` and `sequential_data.txt` from one domain directory.

    Every history item must name a row of the item file; an item file without items raises.
    """
    root = Path(root)
    meta = next((p for p in sorted(root.glob("metadata.jsonl*"))), None)
    if meta is None:
        raise DataFormatError(root, "no metadata.jsonl(.gz) here")
    items = read_reclm_items(meta)
    if not items:
        raise DataFormatError(meta, "no items (the file is empty)")
    seq = root / "sequential_data.txt"
    histories = read_reclm_sequences(seq, n_items=len(items)) if seq.is_file() else []
    return RecLMData(items=items, histories=histories, histories_file=seq)
