"""An item catalog for the RecLM-emb tasks: rendering, attribute values and query constraints.

An item is a `Passage` from `io.reclm` (id = 1-based row of the metadata file, `title`, the other
fields in `metadata`). Which fields mean what is the catalog's `CatalogSchema` (`schema.py`;
Steam's by default). The catalog renders each item as the paper does ("title: X, tags: a, b,
game details: ..., price: 14.99, release date: ...") and answers, for every `Constraint` of a
generated query, which items satisfy it: one boolean mask over the catalog, built from an
inverted index of (field, value) and arrays of prices and dates (a per-item predicate over 32k
items would be too slow for generating thousands of queries). `Constraint.holds` is the same test
on one item's metadata: the constraint-coverage metric and the tests use it. A constraint names
its field, so it is tested the same way whatever the schema.

Torch-free (numpy only).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from chatretriever.methods.items.schema import STEAM_SCHEMA, CatalogSchema
from chatretriever.types import Passage

# the year is 4 digits and no more: "20170305" or a unix time is no year "2017" / "1489"
_DATE = re.compile(r"^(\d{4})(?!\d)(?:-(\d{2}))?(?:-(\d{2}))?")
_WHEN = re.compile(r"\d{4}(?:-\d{2})?")  # the value of a released_* constraint
# a price written as text: "12.99", "$12.99" (not "Starting at $499.00": a range, not a price)
_PRICE_TEXT = re.compile(r"[$€£¥]?\s*(\d+(?:\.\d+)?)")

OPS = ("has", "lacks", "price_below", "price_above", "released_before", "released_after",
       "released_in")  # fmt: skip


def _fold(value: Any) -> str:
    return str(value).strip().casefold()


def field_values(meta: Mapping[str, Any], field: str) -> list[str]:
    """The values of one field as display strings (a list field's items, a scalar as one)."""
    value = meta.get(field)
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v not in (None, "")]
    if isinstance(value, float):
        return [f"{value:g}"]
    return [str(value)]


def price_of(meta: Mapping[str, Any], field: str = "price") -> float | None:
    """The price as a number: a number, or text that is one ("$12.99"); free-to-play strings
    read 0.0; missing or other text is None.

    Args:
        meta: An item's metadata.
        field: The price field (the schema's `price`).
    """
    value = meta.get(field)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        if "free" in value.casefold():
            return 0.0
        m = _PRICE_TEXT.fullmatch(value.strip())
        if m is not None:
            return float(m.group(1))
    return None


def parse_date(value: Any) -> str | None:
    """A date as "YYYY-MM-DD" (or "YYYY-MM", "YYYY"), None when missing or unparsed.

    A month outside 01-12 or a day that the month does not have ("2017-13-05", "2017-00-05",
    "2017-02-30") makes the whole date unparsed: its year may be as wrong as its month. A
    whole number 1000-9999 is a year (1999, 1999.0); other numbers (a unix time, 20170305) and
    digit strings longer than a year are unparsed.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        whole = isinstance(value, int) or value.is_integer()
        return str(int(value)) if whole and 1000 <= value <= 9999 else None
    m = _DATE.match(value) if isinstance(value, str) else None
    if m is None:
        return None
    year, month, day = m.groups()
    if month is not None and not 1 <= int(month) <= 12:
        return None
    if day is not None:
        try:
            datetime.date(int(year), int(month), int(day))
        except ValueError:
            return None
    return "-".join(g for g in m.groups() if g)


def release_of(meta: Mapping[str, Any], field: str = "release_date") -> str | None:
    """An item's date field (the schema's `date`) parsed by `parse_date`."""
    return parse_date(meta.get(field))


@dataclass(frozen=True)
class Constraint:
    """One condition of a query on an item's metadata.

    Attributes:
        field: The metadata field (`tags`, `developer`, `price`, `release_date`, `title`, ...;
            a price or date condition reads this field as the price or date).
        op: "has" (the field holds the value; case-insensitive), "lacks" (it does not),
            "price_below"/"price_above" (value: a number), "released_before"/"released_after"/
            "released_in" (value: "YYYY" or "YYYY-MM"; before/after compare the date's prefix
            of that length, in = the date starts with it).
        value: The value compared with.
    """

    field: str
    op: str
    value: str

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"constraint op must be one of {OPS}, got {self.op!r}")
        if self.op.startswith("price"):
            try:
                float(self.value)
            except ValueError:
                raise ValueError(f"{self.op} needs a number, got {self.value!r}") from None
        elif self.op.startswith("released") and (
            not _WHEN.fullmatch(self.value) or parse_date(self.value) is None
        ):
            raise ValueError(f"{self.op} needs a date YYYY or YYYY-MM, got {self.value!r}")

    def holds(self, meta: Mapping[str, Any]) -> bool:
        """Whether an item's metadata (its `title` included) satisfies this constraint."""
        if self.op in ("has", "lacks"):
            found = _fold(self.value) in {_fold(v) for v in field_values(meta, self.field)}
            return found if self.op == "has" else not found
        if self.op.startswith("price"):
            price = price_of(meta, self.field)
            if price is None:
                return False
            return (
                price < float(self.value) if self.op == "price_below" else price > float(self.value)
            )
        date = release_of(meta, self.field)
        if date is None or len(date) < len(self.value):
            return False
        head = date[: len(self.value)]
        if self.op == "released_before":
            return head < self.value
        return head > self.value if self.op == "released_after" else head == self.value

    def to_dict(self) -> dict[str, str]:
        return {"field": self.field, "op": self.op, "value": self.value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Constraint:
        """A constraint from its `to_dict` form; a missing key or a bad value is a ValueError."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a constraint is an object {{field, op, value}}, got {d!r}")
        missing = [k for k in ("field", "op", "value") if k not in d]
        if missing:
            raise ValueError(f"a constraint needs field, op and value; missing {missing}")
        return cls(str(d["field"]), str(d["op"]), str(d["value"]))


def unusable_values(
    items: Iterable[Passage], schema: CatalogSchema = STEAM_SCHEMA
) -> dict[str, list[Any]]:
    """The values the tasks cannot use, per problem: a date that is not a date YYYY[-MM[-DD]]
    (no date condition holds for its item: "Coming Soon", "Mar 5, 2017", "2017-13-05"), a
    price that is not a number (no price condition holds for it: "12,99 €", "Starting at
    $499.00"), or an element of a list field that is itself a list or an object (it would be
    rendered as its Python text).

    Returns:
        problem -> the offending values, in catalog order (none: an empty dict).
    """
    out: dict[str, list[Any]] = {}
    for p in items:
        if schema.date is not None:
            date = p.metadata.get(schema.date)
            if date not in (None, "") and release_of(p.metadata, schema.date) is None:
                problem = f"{schema.date} is not a date YYYY[-MM[-DD]]"
                out.setdefault(problem, []).append(date)
        if schema.price is not None:
            price = p.metadata.get(schema.price)
            if price not in (None, "") and price_of(p.metadata, schema.price) is None:
                problem = f"{schema.price} is not a price (a number, or text like $12.99)"
                out.setdefault(problem, []).append(price)
        for f in schema.list_fields:
            value = p.metadata.get(f)
            if isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value):
                out.setdefault(f"{f} holds a list or an object", []).append(value)
    return out


def item_metadata(item: Passage) -> dict[str, Any]:
    """An item's metadata with its title (what constraints are tested on)."""
    return {**item.metadata, "title": item.title}


def render_item(item: Passage, schema: CatalogSchema = STEAM_SCHEMA) -> str:
    """The item text the embedders read: "title: X, tags: a, b, game details: ..., price: ..."
    (the schema's `render_order` and `labels`)."""
    parts = [f"title: {item.title}"]
    for key in schema.render_order:
        values = field_values(item.metadata, key)
        if values:
            parts.append(f"{schema.label(key)}: {', '.join(values)}")
    return ", ".join(parts)


class ItemCatalog:
    """Items with the masks of constraints over them.

    Args:
        items: The items (ids unique).
        schema: What their metadata fields are (default: Steam's).
    """

    def __init__(self, items: Sequence[Passage], schema: CatalogSchema = STEAM_SCHEMA) -> None:
        self.items = list(items)
        self.schema = schema
        self.ids = [p.id for p in self.items]
        self.position = {pid: i for i, pid in enumerate(self.ids)}
        if len(self.position) != len(self.ids):
            raise ValueError("item ids must be unique")
        self.meta = [item_metadata(p) for p in self.items]
        self._indexed = {"title", *schema.attribute_fields}
        self._index: dict[tuple[str, str], list[int]] = {}
        for i, meta in enumerate(self.meta):
            for field in self._indexed:
                for v in {_fold(v) for v in field_values(meta, field)}:
                    self._index.setdefault((field, v), []).append(i)
        prices = [None if schema.price is None else price_of(m, schema.price) for m in self.meta]
        self.prices = np.array([np.nan if p is None else p for p in prices])  # (N,)
        dates = [None if schema.date is None else release_of(m, schema.date) for m in self.meta]
        self.dates = [d or "" for d in dates]
        self._mask = lru_cache(maxsize=4096)(self._compute_mask)
        self._popular: dict[str, list[str]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def render(self, item: Passage) -> str:
        """One item's text (`render_item` with this catalog's schema)."""
        return render_item(item, self.schema)

    def texts(self) -> list[str]:
        """The rendered text of every item, in catalog order."""
        return [self.render(p) for p in self.items]

    def item(self, item_id: str) -> Passage:
        return self.items[self.position[item_id]]

    def popular(self, field: str) -> list[str]:
        """The values of a field, most frequent first (ties by value)."""
        if field not in self._popular:
            counts: dict[str, int] = {}
            for meta in self.meta:
                for v in field_values(meta, field):
                    counts[v] = counts.get(v, 0) + 1
            self._popular[field] = sorted(counts, key=lambda v: (-counts[v], v))
        return self._popular[field]

    def has_values(self) -> dict[str, bool]:
        """field -> whether some item has a value for it (every field of any item)."""
        out: dict[str, bool] = {}
        for meta in self.meta:
            for key in meta:
                if not out.get(key):
                    out[key] = bool(field_values(meta, key))
        return out

    def mask(self, constraint: Constraint) -> np.ndarray:
        """(N,) bool: the items that satisfy `constraint` (cached; do not modify)."""
        return self._mask(constraint)

    def _compute_mask(self, c: Constraint) -> np.ndarray:
        out = np.zeros(len(self.items), dtype=bool)
        if c.op in ("has", "lacks"):
            if c.field not in self._indexed:  # a field of no schema kind: test each item
                return np.array([c.holds(m) for m in self.meta], dtype=bool)
            out[self._index.get((c.field, _fold(c.value)), [])] = True
            return out if c.op == "has" else ~out
        if c.op.startswith("price"):
            if c.field != self.schema.price:
                return np.array([c.holds(m) for m in self.meta], dtype=bool)
            with np.errstate(invalid="ignore"):
                below = self.prices < float(c.value)
                above = self.prices > float(c.value)
            return below if c.op == "price_below" else above
        if c.field != self.schema.date:
            return np.array([c.holds(m) for m in self.meta], dtype=bool)
        n = len(c.value)
        for i, d in enumerate(self.dates):
            if len(d) >= n:
                head = d[:n]
                if c.op == "released_before":
                    out[i] = head < c.value
                elif c.op == "released_after":
                    out[i] = head > c.value
                else:
                    out[i] = head == c.value
        return out

    def matching(self, constraints: Iterable[Constraint]) -> np.ndarray:
        """(N,) bool: the items that satisfy every constraint (all items for none)."""
        out = np.ones(len(self.items), dtype=bool)
        for c in constraints:
            out &= self.mask(c)
        return out

    def satisfies_all(self, item_id: str, constraints: Iterable[Constraint]) -> bool:
        """Whether one item satisfies every constraint (the per-item predicate)."""
        meta = self.meta[self.position[item_id]]
        return all(c.holds(meta) for c in constraints)
