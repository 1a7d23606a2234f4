"""Infer a `CatalogSchema` from the items themselves (`build-items --schema infer`).

Conservative: a field gets a kind only when nearly all of its values agree (90%), and a field
present in fewer than 5% of the items gets none. Per field, in the order the items first name
them:

- lists of strings (or numbers) whose values repeat across items -> a list field;
- a field named like price/cost whose values read as prices -> the price;
- a field whose values are dates YYYY-MM[-DD] (or, when a word of its name is date, year or
  released, any YYYY[-MM[-DD]], a year number 1000-9999 included) -> the date;
- long strings (40+ characters on average), or strings named like a description (overview,
  summary, plot, ...) -> a text field (rendered, never a condition);
- short strings that repeat (at most 80% distinct) -> a scalar field;
- anything else (booleans, other numbers, ids, lists of objects) -> ignored, and listed so.

The tag field is the first list field named like tags (tags, keywords, features, ...), else like
genres (genres, categories, ...), else the one whose values repeat most (items per distinct
value: genres rather than cast); the genre field is a second list field named like genres. The
noun is "item" (the neutral templates); price steps are round quantiles
of the prices. The result is printed and saved as `schema.json`: edit it and pass it back with
`--schema FILE` to change anything.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chatretriever.methods.items.catalog import parse_date, price_of
from chatretriever.methods.items.schema import RESERVED, CatalogSchema
from chatretriever.types import Passage

logger = logging.getLogger(__name__)

MOSTLY = 0.9  # share of a field's values that must agree on its kind
MIN_PRESENT = 0.05  # a field in fewer items than this share is ignored
LONG_TEXT = 40  # mean characters from which a string field is text, not an attribute
MAX_DISTINCT = 0.8  # a scalar field's distinct values, at most this share of its items
_PRICE_NAME = re.compile(r"price|cost", re.IGNORECASE)
# a whole word of the name ("release_date", "releaseYear"), not a part of one ("yearly_sales")
_DATE_WORDS = {"date", "year", "released"}
_WORD = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
_TEXT_NAME = re.compile(r"desc|overview|summary|synopsis|plot|review", re.IGNORECASE)
_FULL_DATE = re.compile(r"\d{4}-\d{2}(?:-\d{2})?")
_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
_TAG_NAME = re.compile(r"tag|keyword|label|topic|theme|style|feature", re.IGNORECASE)
_GENRE_NAME = re.compile(r"genre|categor|type|class|subject", re.IGNORECASE)


@dataclass
class _Stats:
    """What the values of one field look like over the catalog."""

    present: int = 0
    lists: int = 0
    strings: int = 0
    numbers: int = 0
    nested: bool = False
    elements: list[str] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)

    def add(self, value: Any) -> None:
        if value is None or value == "" or value == []:
            return
        self.present += 1
        self.values.append(value)
        if isinstance(value, list):
            self.lists += 1
            self.nested |= any(isinstance(v, (list, dict)) for v in value)
            self.elements += [str(v) for v in value if v not in (None, "")]
        elif isinstance(value, str):
            self.strings += 1
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            self.numbers += 1

    def mostly(self, count: int) -> bool:
        return count >= MOSTLY * self.present


def _stats(items: Sequence[Passage]) -> dict[str, _Stats]:
    out: dict[str, _Stats] = {}
    for p in items:
        for key, value in p.metadata.items():
            if key not in RESERVED:
                out.setdefault(key, _Stats()).add(value)
    return out


def _kind(name: str, s: _Stats, n_items: int) -> tuple[str, str]:
    """(kind, why) of one field: kind is list, price, date, text, scalar or ignore."""
    if s.present < max(1, MIN_PRESENT * n_items):
        return "ignore", f"in {s.present} of {n_items} items only"
    if s.mostly(s.lists):
        if s.nested:
            return "ignore", "lists of lists or objects"
        if len(set(s.elements)) < len(s.elements):
            return "list", f"lists, {len(set(s.elements))} distinct values"
        return "ignore", "lists whose values never repeat"
    prices = sum(price_of({name: v}, name) is not None for v in s.values)
    if _PRICE_NAME.search(name) and s.mostly(prices):
        return "price", "named like a price, values read as prices"
    strict = sum(isinstance(v, str) and bool(_FULL_DATE.match(v)) for v in s.values)
    dates = s.mostly(sum(parse_date(v) is not None for v in s.values))
    if dates and (_named_like_date(name) or s.mostly(strict)):
        return "date", "values read as dates"
    if not s.mostly(s.strings):
        return "ignore", "neither lists nor strings (numbers, booleans or mixed)"
    texts = [v.strip() for v in s.values if isinstance(v, str)]
    if np.mean([len(t) for t in texts]) >= LONG_TEXT or _TEXT_NAME.search(name):
        return "text", "long strings, or named like a description"
    distinct = len(set(texts))
    if distinct < len(texts) and distinct <= MAX_DISTINCT * len(texts):
        return "scalar", f"short strings, {distinct} distinct in {len(texts)} items"
    return "ignore", "short strings that rarely repeat (ids, names of one item)"


def _named_like_date(name: str) -> bool:
    """Whether one word of a field name (snake_case or camelCase) is date, year or released."""
    return any(w.lower() in _DATE_WORDS for w in _WORD.findall(name))


def _price_steps(items: Sequence[Passage], price: str) -> tuple[float, ...] | None:
    """Round (2 significant digits) quantiles of the positive prices; None: too few prices."""
    prices = [p for item in items if (p := price_of(item.metadata, price)) is not None and p > 0]
    if len(prices) < 2:
        return None
    steps = sorted({float(f"{q:.2g}") for q in np.quantile(prices, _QUANTILES)})
    return tuple(s for s in steps if s > 0) or None


def _roles(lists: Sequence[str], stats: dict[str, _Stats]) -> tuple[str | None, str | None]:
    """(tag field, genre field) among the list fields (see the module docstring)."""
    if not lists:
        return None, None
    tagged = [f for f in lists if _TAG_NAME.search(f)]
    genres = [f for f in lists if _GENRE_NAME.search(f) and f not in tagged]

    def repeats(f: str) -> float:
        return len(stats[f].elements) / len(set(stats[f].elements))

    tag = (tagged or genres or [max(lists, key=repeats)])[0]  # max keeps the first of equals
    genre = next((f for f in genres if f != tag), None)
    return tag, genre


def infer_schema(items: Sequence[Passage]) -> CatalogSchema:
    """A schema from the items' metadata (see the module docstring).

    Args:
        items: The catalog (`io.reclm.load_reclm(...).items`).

    Returns:
        The schema; every field it gives no kind is listed in `ignore`.
    """
    stats = _stats(items)
    kinds: dict[str, list[str]] = {}
    for name, s in stats.items():
        kind, why = _kind(name, s, len(items))
        if kind in ("price", "date") and kinds.get(kind):
            kind, why = "ignore", f"a second {kind} field ({kinds[kind][0]} is the {kind})"
        logger.info("schema: %s -> %s (%s)", name, kind, why)
        kinds.setdefault(kind, []).append(name)
    lists = kinds.get("list", [])
    tag, genre = _roles(lists, stats)
    price = (kinds.get("price") or [None])[0]
    steps = _price_steps(items, price) if price else None
    return CatalogSchema(
        list_fields=tuple(lists),
        scalar_fields=tuple(kinds.get("scalar", [])),
        price=price,
        date=(kinds.get("date") or [None])[0],
        text_fields=tuple(kinds.get("text", [])),
        tag_field=tag,
        genre_field=genre,
        ignore=tuple(kinds.get("ignore", [])),
        **({"price_steps": steps} if steps else {}),
    )
