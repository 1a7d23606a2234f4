"""Which of the ten tasks a catalog can serve, from the field kinds its schema names and its
items fill (`build_items` plans with it): a task whose kind of field has no value in the
catalog is skipped with one warning, and the reason is saved under `skipped`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from chatretriever.methods.items.schema import RESERVED, STEAM_SCHEMA, CatalogSchema

logger = logging.getLogger(__name__)

_NEEDS: dict[str, tuple[tuple[str, ...], str]] = {
    "US2I": (("tag",), "a tag field (tag_field)"),
    "AS2I": (("tag", "genre"), "a tag or genre field (tag_field, genre_field)"),
    "NA2I": (("tag",), "a tag field (tag_field)"),
    "UQ2I": (("list",), "a list field (list_fields)"),
    "FA2I": (("attribute",), "an attribute field (list_fields, scalar_fields, price, date)"),
    "SA2I": (("attribute",), "an attribute field (list_fields, scalar_fields, price, date)"),
    "VC2I": (("price", "date"), "a price or a date field (price, date)"),
}
"""task -> (field kinds, any one of which it needs; the text naming them). UH2I, I2I and NM2I
need only titles and histories."""


def missing_kind(task: str, kinds: set[str]) -> str | None:
    """What a task needs that the catalog lacks (None: it can be built).

    Args:
        task: A task code.
        kinds: The field kinds with values in the catalog (`present_kinds`).
    """
    wanted, text = _NEEDS.get(task, ((), ""))
    return text if wanted and not set(wanted) & kinds else None


def present_kinds(
    schema: CatalogSchema, has_values: Mapping[str, bool], parsed: Mapping[str, bool]
) -> set[str]:
    """The field kinds that have values in a catalog.

    Args:
        schema: The schema.
        has_values: field -> whether some item has a value for it.
        parsed: "price"/"date" -> whether some item's price / date parses.
    """
    kinds = {k for k in ("price", "date") if getattr(schema, k) and parsed.get(k)}
    for kind, name in (("tag", schema.tag_field), ("genre", schema.genre_field)):
        if name is not None and has_values.get(name):
            kinds.add(kind)
    if any(has_values.get(f) for f in schema.list_fields):
        kinds.add("list")
    if kinds & {"price", "date", "list"} or any(has_values.get(f) for f in schema.scalar_fields):
        kinds.add("attribute")
    return kinds


def unused_fields(schema: CatalogSchema, seen: Sequence[str]) -> tuple[list[str], list[str]]:
    """(fields of the items the schema does not name, schema fields no item has).

    Args:
        schema: The schema.
        seen: The metadata fields that some item has a value for, in first-seen order.
    """
    named = set(schema.used_fields)
    unnamed = [f for f in seen if f not in named and f not in RESERVED and f != "id"]
    have = set(seen)
    absent = [f for f in schema.attribute_fields + schema.text_fields if f not in have]
    return unnamed, absent


def _unread(
    schema: CatalogSchema, has_values: Mapping[str, bool], parsed: Mapping[str, bool]
) -> str:
    """Why a filled price or date field did not count: its values do not read as prices or
    dates (the build's first warnings list some); "" when none is so."""
    notes = [
        f"; the values of {name} do not read as {kind}s"
        for kind in ("price", "date")
        if (name := getattr(schema, kind)) and has_values.get(name) and not parsed.get(kind)
    ]
    return "".join(notes)


def plan_tasks(
    schema: CatalogSchema,
    has_values: Mapping[str, bool],
    parsed: Mapping[str, bool],
    tasks: Sequence[str],
) -> tuple[list[str], dict[str, str]]:
    """The tasks a catalog's fields allow, and why each other one is skipped (one warning per
    skipped task); also warns of item fields the schema leaves unused and of schema fields
    that no item has.

    Args:
        schema: The schema.
        has_values: field -> whether some item has a value for it.
        parsed: "price"/"date" -> whether some item's price / date parses.
        tasks: The tasks asked for.

    Returns:
        (the tasks to build, in order; skipped task -> what it needs).

    Raises:
        ValueError: None of `tasks` can be built.
    """
    unnamed, absent = unused_fields(schema, [f for f, v in has_values.items() if v])
    which = "Steam's schema (the default)" if schema == STEAM_SCHEMA else "the schema"
    if unnamed:
        logger.warning(
            "item fields %s are in no kind of %s: never rendered nor asked for (describe "
            "them with --schema FILE, or --schema infer; or list them under 'ignore')",
            ", ".join(unnamed),
            which,
        )
    if absent:
        logger.warning("no item has a value for %s of %s", ", ".join(absent), which)
    kinds = present_kinds(schema, has_values, parsed)
    skipped = {t: why for t in tasks if (why := missing_kind(t, kinds)) is not None}
    unread = _unread(schema, has_values, parsed)
    for task, why in skipped.items():
        note = unread if set(_NEEDS[task][0]) & {"price", "date", "attribute"} else ""
        logger.warning("%s skipped: it needs %s with values in the catalog%s", task, why, note)
    built = [t for t in tasks if t not in skipped]
    if not built:
        raise ValueError(
            f"none of the tasks {', '.join(tasks)} can be built from this catalog with "
            f"{which}: {'; '.join(f'{t} needs {w}' for t, w in skipped.items())}"
            f"{unread}"
        )
    return built, skipped
