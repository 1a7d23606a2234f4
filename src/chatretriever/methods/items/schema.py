"""The catalog schema: which metadata fields of an item the ten tasks use, and how.

RecLM-emb's items are Steam games (`tags, genres, game_details, developer, publisher, price,
release_date`); a user's catalog has its own fields (a movie's `genres, director, cast, year`, a
product's `brand, category, price`). A `CatalogSchema` names them by kind:

- list fields: several values per item (Steam: tags, genres, game details): query attributes,
  the values that narrow a query, UQ2I's attributes;
- scalar fields: one value (developer, publisher): query attributes;
- the price field (a number; "free..." strings read 0) and the date field (YYYY[-MM[-DD]]):
  query attributes and VC2I's vague conditions;
- text fields: rendered into the item text, never a condition (a description);
- roles: `tag_field` (the list field that describes an item best: US2I's summary, AS2I's search
  word, NA2I's negations, the recommender's candidate lines) and `genre_field` (a coarser list
  field: US2I's "Enjoys X games", AS2I's fallback, NA2I's wanted attributes);
- how items are shown: `render_order`, display `labels`, and the `noun` ("game" keeps the paper's
  Steam wording; any other noun uses neutral templates that name it).

`STEAM_SCHEMA` is the default and reproduces the Steam build byte for byte. A schema is a small
JSON or YAML file (`load_schema`), or inferred from the data (`infer.infer_schema`); `build-items`
saves the one it used as `schema.json` beside its output, where `eval-items` and `recommend` read
it back (`schema_of_dir`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.atomic import atomic_write
from chatretriever.io.files import read_json, read_text

SCHEMA_FILE = "schema.json"
GAME_NOUN = "game"  # the noun of the paper's Steam templates (`templates.TEMPLATES`)
RESERVED = ("title", "item_id")  # always the title; the dataset's own id, never shown
_NOUN = re.compile(r"[^\W\d_][\w' -]*")  # words: no braces (it is put into templates)


class SchemaError(ValueError):
    """A bad schema: `key` names the schema key that is wrong ("": the whole schema)."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


@dataclass(frozen=True)
class CatalogSchema:
    """Which metadata fields are what (see the module docstring); every key is optional.

    Attributes:
        list_fields: Fields holding several values per item.
        scalar_fields: Fields holding one value.
        price: The price-like number field (None: no price).
        date: The date field, YYYY[-MM[-DD]] (None: no date).
        text_fields: Fields rendered but never used as a condition.
        tag_field: The list field of descriptive tags (default: the first list field other
            than the genre field).
        genre_field: A coarser list field (default: none).
        render_order: Fields shown after the title, in order (default: list, scalar, price,
            date, text fields).
        labels: field -> display name (default: the field name with "_" as " ").
        noun: What one item is ("game": the paper's Steam templates).
        plural: The plural of the noun (default: noun + "s").
        price_steps: The round prices VC2I's "price below/above $X" conditions use.
        ignore: Fields deliberately unused (no "unused field" warning for them).
    """

    list_fields: tuple[str, ...] = ()
    scalar_fields: tuple[str, ...] = ()
    price: str | None = None
    date: str | None = None
    text_fields: tuple[str, ...] = ()
    tag_field: str | None = None
    genre_field: str | None = None
    render_order: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    noun: str = "item"
    plural: str = ""
    price_steps: tuple[float, ...] = (1.0, 5.0, 10.0, 15.0, 20.0, 30.0, 50.0)
    ignore: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key in ("list_fields", "scalar_fields", "text_fields", "render_order", "ignore"):
            object.__setattr__(self, key, _names(key, getattr(self, key)))
        for key in ("price", "date", "tag_field", "genre_field"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise SchemaError(key, f"expected a field name or null, got {value!r}")
        self._check_kinds()
        if self.tag_field is None:  # the genre field is the coarser one: never the tags too
            others = [f for f in self.list_fields if f != self.genre_field]
            object.__setattr__(self, "tag_field", others[0] if others else None)
        for key in ("tag_field", "genre_field"):
            value = getattr(self, key)
            if value is not None and value not in self.list_fields:
                raise SchemaError(
                    key, f"{value!r} is not one of the list_fields {list(self.list_fields)}"
                )
        if self.genre_field is not None and self.genre_field == self.tag_field:
            raise SchemaError("genre_field", "must differ from tag_field")
        if not self.render_order:
            object.__setattr__(self, "render_order", (*self.attribute_fields, *self.text_fields))
        if set(self.render_order) & set(RESERVED):
            msg = f"the title is always shown first; {RESERVED} cannot be listed"
            raise SchemaError("render_order", msg)
        object.__setattr__(self, "labels", _labels(self.labels, self.used_fields))
        for key in ("noun", "plural"):
            value = getattr(self, key)
            if key == "plural" and value == "":
                object.__setattr__(self, key, f"{self.noun}s")
            elif not isinstance(value, str) or not _NOUN.fullmatch(value):
                raise SchemaError(key, f"expected a word or words, got {value!r}")
        object.__setattr__(self, "price_steps", _steps(self.price_steps))

    def _check_kinds(self) -> None:
        """Each field has one kind; the title and the dataset id are none."""
        kinds: dict[str, str] = {}
        for key in ("list_fields", "scalar_fields", "price", "date", "text_fields", "ignore"):
            value = getattr(self, key)
            for name in (value,) if isinstance(value, str) else value or ():
                if name in RESERVED:  # the title is always shown; item_id is the dataset's id
                    raise SchemaError(key, f"{name!r} cannot be given a kind")
                if name in kinds:
                    raise SchemaError(key, f"{name!r} is already in {kinds[name]}")
                kinds[name] = key

    @property
    def attribute_fields(self) -> tuple[str, ...]:
        """The fields a query may ask for (FA2I/SA2I): list, scalar, price, date, in order."""
        extra = tuple(f for f in (self.price, self.date) if f is not None)
        return (*self.list_fields, *self.scalar_fields, *extra)

    @property
    def used_fields(self) -> tuple[str, ...]:
        """Every field the schema names (attributes, text, render order, ignored)."""
        names = (*self.attribute_fields, *self.text_fields, *self.render_order, *self.ignore)
        return tuple(dict.fromkeys(names))

    def label(self, name: str) -> str:
        """A field's display name ("game_details" -> "game details")."""
        return self.labels.get(name, name.replace("_", " "))

    def to_dict(self) -> dict[str, Any]:
        """The schema as JSON-ready data (`from_dict` reads it back)."""
        return {
            "noun": self.noun,
            "plural": self.plural,
            "list_fields": list(self.list_fields),
            "scalar_fields": list(self.scalar_fields),
            "price": self.price,
            "date": self.date,
            "text_fields": list(self.text_fields),
            "tag_field": self.tag_field,
            "genre_field": self.genre_field,
            "render_order": list(self.render_order),
            "labels": dict(self.labels),
            "price_steps": [float(s) for s in self.price_steps],
            "ignore": list(self.ignore),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CatalogSchema:
        """A schema from `to_dict`'s form; unknown keys are refused (a typo must not pass).

        Raises:
            SchemaError: A bad key or value (its `key` names it).
        """
        if not isinstance(data, Mapping):
            raise SchemaError("", f"expected an object of schema keys, got {data!r}")
        known = list(cls.__dataclass_fields__)
        for key in data:
            if key not in known:
                raise SchemaError(str(key), f"unknown schema key; known: {', '.join(known)}")
        return cls(**dict(data))


def _names(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise SchemaError(key, f"expected a list of field names, got {value!r}")
    out = tuple(value)
    bad = [v for v in out if not isinstance(v, str) or not v.strip()]
    if bad:
        raise SchemaError(key, f"expected field names, got {bad[0]!r}")
    if len(set(out)) != len(out):
        raise SchemaError(key, f"a field is listed twice: {list(out)}")
    return out


def _labels(value: Any, fields: Sequence[str]) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise SchemaError("labels", f"expected an object field -> display name, got {value!r}")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str) or not v.strip():
            raise SchemaError("labels", f"expected field -> display name, got {k!r}: {v!r}")
        if k in RESERVED:
            raise SchemaError("labels", f"{k!r} cannot be relabelled (the title is 'title:')")
        if k not in fields:  # a typo would silently keep the field's own name
            raise SchemaError("labels", f"{k!r} is no field of the schema: {list(fields)}")
    return dict(value)


def _steps(value: Any) -> tuple[float, ...]:
    steps = _numbers(value)
    # NaN would turn every price condition off; infinity would say "price below $inf"
    if (
        not steps
        or not all(map(math.isfinite, steps))
        or steps != sorted(set(steps))
        or steps[0] <= 0
    ):
        raise SchemaError(
            "price_steps", f"expected increasing positive finite numbers, got {value!r}"
        )
    return tuple(float(s) for s in steps)


def _numbers(value: Any) -> list[float]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        return []
    out = list(value)
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in out):
        return []
    return out


# "description" is only shown (where an item has one): no condition, no "absent field" warning
STEAM_SCHEMA = CatalogSchema(
    list_fields=("tags", "genres", "game_details"),
    scalar_fields=("developer", "publisher"),
    price="price",
    date="release_date",
    tag_field="tags",
    genre_field="genres",
    render_order=(
        "tags",
        "genres",
        "game_details",
        "publisher",
        "developer",
        "price",
        "release_date",
        "description",
    ),
    noun=GAME_NOUN,
    ignore=("sentiment", "early_access"),
)
"""RecLM-emb's Steam schema (the default): the item text and queries of the paper."""


def load_schema(path: str | Path) -> CatalogSchema:
    """A schema from a JSON file (or YAML: `.yaml`/`.yml`, any case).

    Raises:
        DataFormatError: Unreadable file (not UTF-8: its line), malformed JSON or YAML (its
            line; a YAML key given twice), or a bad key, naming the file and the key.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "no such schema file")
    if path.suffix.lower() not in (".yaml", ".yml"):
        data = read_json(path)
    else:
        import yaml

        from chatretriever.modeling.recipe import yaml_load  # a key given twice is refused

        try:
            data = yaml_load(read_text(path))
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)  # yaml's own text spans lines
            line = None if where is None else where.line + 1
            raise DataFormatError(
                path, f"malformed YAML ({getattr(e, 'problem', e)})", line
            ) from None
    try:
        return CatalogSchema.from_dict(data)
    except SchemaError as e:
        raise DataFormatError(path, e.message, field=e.key or None) from None


def save_schema(path: str | Path, schema: CatalogSchema) -> None:
    """Write a schema as JSON (atomically)."""
    with atomic_write(path) as f:
        json.dump(schema.to_dict(), f, indent=2)
        f.write("\n")


def schema_of_dir(directory: str | Path) -> CatalogSchema:
    """The schema a `build-items` output was built with: its `schema.json`, else Steam's (a
    directory built before schemas existed)."""
    path = Path(directory) / SCHEMA_FILE
    return load_schema(path) if path.is_file() else STEAM_SCHEMA
