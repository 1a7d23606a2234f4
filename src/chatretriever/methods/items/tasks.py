"""The ten RecLM-emb query generators: (query, target item ids, 7 negatives that violate it).

Each generator draws one query from a `TaskContext` with a `random.Random`; `generate` draws
until it has n distinct queries, so a seed fixes the output. Negatives never satisfy the query:
they fail one of its constraints (hard ones fail just one, when such items exist), have the
negated value, are outside the user's whole history, or do not co-occur with the source item.
Attribute targets are every catalog item meeting all constraints; queries are narrowed (one more
attribute of the source item at a time) until at most `max_targets` items match. The shared
pieces are in `sampling.py`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from chatretriever.methods.items.catalog import Constraint, field_values, price_of, release_of
from chatretriever.methods.items.sampling import (
    ItemQuery,
    TaskContext,
    cooccurrence,
    describe,
    history_cut,
    history_text,
    ids_of,
    narrow,
    outside,
    pick_template,
    sample_attributes,
    sample_ids,
    violators,
)
from chatretriever.methods.items.schema import CatalogSchema
from chatretriever.methods.items.templates import TASKS

__all__ = ["GENERATORS", "ItemQuery", "TaskContext", "cooccurrence", "describe", "generate"]

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


# --- the ten generators -------------------------------------------------------------------------


def uh2i(ctx: TaskContext, rng: random.Random) -> ItemQuery | None:
    """A user's history (newest first, capped) -> the next item; negatives outside the user's
    whole history (a later item of the same user would be a false negative)."""
    cut = history_cut(ctx, rng)
    if cut is None or cut[2] in cut[1]:
        return None
    user, before, target = cut
    k, tpl = pick_template(ctx, rng, "UH2I")
    seen = set(user.items)
    negs = sample_ids(ctx, rng, outside(ctx, seen), seen, ctx.n_negatives)
    query = tpl.format(history=history_text(ctx, before))
    return ItemQuery("UH2I", query, (target,), tuple(negs), (), tuple(before), k)


def i2i(ctx: TaskContext, rng: random.Random) -> ItemQuery | None:
    """An item's title (+ attributes) -> the items that co-occur with it most (top 10)."""
    sources = sorted(i for i in ctx.cooccurrence if i in ctx.catalog.position)
    if not sources:
        return None
    src = sources[rng.randrange(len(sources))]
    targets = [i for i, _ in ctx.cooccurrence[src] if i in ctx.catalog.position][:10]
    if not targets:
        return None
    k, tpl = pick_template(ctx, rng, "I2I")
    related = {src, *(i for i, _ in ctx.cooccurrence[src])}
    negs = sample_ids(ctx, rng, outside(ctx, related), related, ctx.n_negatives)
    query = tpl.format(title=ctx.catalog.item(src).title)
    return ItemQuery("I2I", query, tuple(targets), tuple(negs), (), (src,), k)


def _summary(ctx: TaskContext, items: Sequence[str]) -> tuple[str, list[str]]:
    """A short summary of a user's tastes: the most frequent tags and genre of the history
    (the schema's tag and genre fields)."""
    schema = ctx.catalog.schema
    counts: dict[str, int] = {}
    genres: dict[str, int] = {}
    for i in items:
        meta = ctx.catalog.meta[ctx.catalog.position[i]]
        for t in _values(meta, schema.tag_field):
            counts[t] = counts.get(t, 0) + 1
        for g in _values(meta, schema.genre_field):
            genres[g] = genres.get(g, 0) + 1
    top = sorted(counts, key=lambda t: (-counts[t], t))[:3]
    genre = min(genres, key=lambda g: (-genres[g], g)) if genres else "all kinds of"
    return f"Enjoys {genre} {schema.plural}, especially ones tagged {', '.join(top)}.", top


def _values(meta: dict[str, Any], field: str | None) -> list[str]:
    """A field's values; none for a role the schema leaves empty (None)."""
    return [] if field is None else field_values(meta, field)


def us2i(ctx: TaskContext, rng: random.Random) -> ItemQuery | None:
    """A summary of a user's tastes -> the items of that user; negatives lack its top tags."""
    if not ctx.histories:
        return None
    user = ctx.histories[rng.randrange(len(ctx.histories))]
    summary, top = _summary(ctx, user.items)
    if not top:
        return None
    k, tpl = pick_template(ctx, rng, "US2I")
    tag_field = ctx.catalog.schema.tag_field
    if tag_field is None:  # no tags to sum a user up with (`build_items` skips US2I then)
        return None
    lacking = ctx.catalog.matching([Constraint(tag_field, "lacks", t) for t in top])
    seen = set(user.items)
    negs = sample_ids(ctx, rng, lacking & outside(ctx, seen), seen, ctx.n_negatives)
    positives = tuple(dict.fromkeys(reversed(user.items)))  # newest first
    return ItemQuery("US2I", tpl.format(summary=summary), positives, tuple(negs), (), (), k)


def _attribute_query(
    ctx: TaskContext, rng: random.Random, task: str, n_fields: int | None, n_values: int
) -> ItemQuery | None:
    schema = ctx.catalog.schema
    fields = schema.attribute_fields
    src = ctx.catalog.ids[rng.randrange(len(ctx.catalog))]
    meta = ctx.catalog.meta[ctx.catalog.position[src]]
    n = rng.randint(1, n_fields or len(fields))
    attrs = sample_attributes(rng, meta, fields, n, n_values, schema.list_fields)
    attrs = narrow(ctx, rng, meta, attrs) if attrs else None
    if not attrs:
        return None
    negs = violators(ctx, rng, attrs, {src})
    if negs is None:
        return None
    targets = (src, *(i for i in ids_of(ctx, ctx.catalog.matching(attrs)) if i != src))
    k, tpl = pick_template(ctx, rng, task)
    return ItemQuery(task, tpl.format(attributes=describe(attrs, schema)), targets, tuple(negs),
                     tuple(attrs), (), k)  # fmt: skip


def fa2i(ctx: TaskContext, rng: random.Random) -> ItemQuery | None:
    """Sampled attributes (1..all fields, 1..all values) -> the items that have them all."""
    return _attribute_query(ctx, rng, "FA2I", n_fields=None, n_values=100)  # None: every field


def sa2i(ctx: TaskContext, rng: random.Random) -> ItemQuery | None:
    """Sparse attributes (1-3 fields, 1-2 values each) -> the items that have them all."""
    return _attribute_query(ctx, rng, "SA2I", n_fields=3, n_values=2)


def as2i(ctx: TaskContext, rng: random.Random) -> ItemQuery | None:
    """A short search query (title keywords + a tag) -> the item; negatives lack the tag."""
    src = ctx.catalog.ids[rng.randrange(len(ctx.catalog))]
    meta = ctx.catalog.meta[ctx.catalog.position[src]]
    words = str(meta["title"]).split()
    schema = ctx.catalog.schema
    field = schema.tag_field if _values(meta, schema.tag_field) else schema.genre_field
    tags = _values(meta, field)
    if not words or field is None or not tags:
        return None
    keep = sorted(rng.sample(range(len(words)), max(1, len(words) - rng.randint(0, 1))))
    tag = rng.choice(tags)
    cons = (Constraint(field, "has", tag),)
    negs = violators(ctx, rng, cons, {src})
    if negs is None:
        return None
    k, tpl = pick_template(ctx, rng, "AS2I")
    query = tpl.format(keywords=" ".join(words[i] for i in keep).lower(), tag=tag.lower())
    return ItemQuery("AS2I", query, (src,), tuple(negs), cons, (), k)


def misspell(title: str, rng: random.Random, p: float = 0.1) -> str:
    """Each character replaced by a random letter or deleted with probability p (never the
    unchanged title when the title has a letter)."""
    for _ in range(20):
        out = []
        for ch in title:
            if rng.random() < p:
                if rng.random() < 0.5:
                    out.append(rng.choice(_LETTERS))
                continue
            out.append(ch)
        text = "".join(out).strip()
        if text and text.casefold() != title.casefold():
            return text
    return title[:-1] if len(title) > 1 else title + "x"


def nm2i(ctx: TaskContext, rng: random.Random) -> ItemQuery | None:
    """A misspelled title -> the item (and any item of that exact title)."""
    src = ctx.catalog.ids[rng.randrange(len(ctx.catalog))]
    title = ctx.catalog.item(src).title
    cons = (Constraint("title", "has", title),)
    negs = violators(ctx, rng, cons, {src})
    if negs is None:
        return None
    same = tuple(i for i in ids_of(ctx, ctx.catalog.matching(cons)) if i != src)
    k, tpl = pick_template(ctx, rng, "NM2I")
    query = tpl.format(misspelled=misspell(title, rng))
    return ItemQuery("NM2I", query, (src, *same), tuple(negs), cons, (), k)


def _conditions(
    rng: random.Random, meta: dict[str, Any], schema: CatalogSchema
) -> list[Constraint]:
    """1-2 vague conditions the item meets: a price bound (at the schema's `price_steps`)
    and/or a release-date condition."""
    out = []
    price = None if schema.price is None else price_of(meta, schema.price)
    date = None if schema.date is None else release_of(meta, schema.date)
    if price is not None and rng.random() < 0.7:
        above = [s for s in schema.price_steps if s > price]
        below = [s for s in schema.price_steps if s < price]
        if above and (not below or rng.random() < 0.6):
            out.append(Constraint(str(schema.price), "price_below", f"{rng.choice(above[:2]):g}"))
        elif below:
            out.append(Constraint(str(schema.price), "price_above", f"{rng.choice(below[-2:]):g}"))
    if date is not None and (not out or rng.random() < 0.6):
        year, field = int(date[:4]), str(schema.date)
        op = rng.choice(("released_before", "released_after", "released_in"))
        if op == "released_before":
            out.append(Constraint(field, op, str(year + rng.randint(1, 3))))
        elif op == "released_after":
            out.append(Constraint(field, op, str(year - rng.randint(1, 3))))
        else:
            out.append(Constraint(field, op, date[:7] if len(date) >= 7 else date[:4]))
    return out


def _describe_conditions(constraints: Sequence[Constraint], schema: CatalogSchema) -> str:
    """ "with tags: X; price below $10; released after 2015" phrased as a condition list."""
    return describe(constraints, schema).replace("tags: ", "tagged ").replace("; ", ", ")


def vc2i(ctx: TaskContext, rng: random.Random) -> ItemQuery | None:
    """Vague conditions (price below/above, released before/after/in) narrowed by the item's
    tags -> every item meeting them."""
    src = ctx.catalog.ids[rng.randrange(len(ctx.catalog))]
    meta = ctx.catalog.meta[ctx.catalog.position[src]]
    conds = _conditions(rng, meta, ctx.catalog.schema)
    conds = narrow(ctx, rng, meta, conds) if conds else None
    if not conds:
        return None
    negs = violators(ctx, rng, conds, {src})
    if negs is None:
        return None
    targets = (src, *(i for i in ids_of(ctx, ctx.catalog.matching(conds)) if i != src))
    k, tpl = pick_template(ctx, rng, "VC2I")
    query = tpl.format(conditions=_describe_conditions(conds, ctx.catalog.schema))
    return ItemQuery("VC2I", query, targets, tuple(negs), tuple(conds), (), k)


def na2i(ctx: TaskContext, rng: random.Random) -> ItemQuery | None:
    """An item's attributes plus 1-2 tags it lacks, negated -> the items meeting all; the
    negatives have a negated tag (hard ones also have every wanted attribute)."""
    schema = ctx.catalog.schema
    tag_field = schema.tag_field
    if tag_field is None:  # no tags to negate (`build_items` skips NA2I then)
        return None
    src = ctx.catalog.ids[rng.randrange(len(ctx.catalog))]
    meta = ctx.catalog.meta[ctx.catalog.position[src]]
    # genre first, then tags: the seeded draws (and Steam's queries) depend on the order
    wanted_fields = tuple(f for f in (schema.genre_field, tag_field) if f is not None)
    attrs = sample_attributes(rng, meta, wanted_fields, 2, 2, schema.list_fields)
    own = set(field_values(meta, tag_field))
    others = [v for v in ctx.catalog.popular(tag_field) if v not in own]
    if not attrs or len(others) < 2:
        return None
    negated = [
        Constraint(tag_field, "lacks", v) for v in rng.sample(others[:30], rng.randint(1, 2))
    ]
    cons = narrow(ctx, rng, meta, [*attrs, *negated])
    if cons is None:
        return None
    wanted = [c for c in cons if c.op == "has"]
    bad = ctx.catalog.matching(wanted) & ~ctx.catalog.matching(negated)
    negs = sample_ids(ctx, rng, bad, {src}, ctx.n_negatives)
    if len(negs) < ctx.n_negatives:
        more = violators(ctx, rng, cons, {src, *negs}) or []
        negs = (negs + more)[: ctx.n_negatives]
    targets = (src, *(i for i in ids_of(ctx, ctx.catalog.matching(cons)) if i != src))
    k, tpl = pick_template(ctx, rng, "NA2I")
    query = tpl.format(attributes=describe(wanted, schema), negated=describe(negated, schema))
    return ItemQuery("NA2I", query, targets, tuple(negs), tuple(cons), (), k)


def uq2i(ctx: TaskContext, rng: random.Random) -> ItemQuery | None:
    """A user's history + attributes of the next item -> that item; negatives violate the
    attributes and lie outside the user's whole history."""
    cut = history_cut(ctx, rng)
    if cut is None or cut[2] in cut[1]:
        return None
    user, before, target = cut
    meta = ctx.catalog.meta[ctx.catalog.position[target]]
    schema = ctx.catalog.schema
    attrs = sample_attributes(rng, meta, schema.list_fields, 2, 2, schema.list_fields)
    if not attrs:
        return None
    negs = violators(ctx, rng, attrs, set(user.items))
    if negs is None:
        return None
    k, tpl = pick_template(ctx, rng, "UQ2I")
    query = tpl.format(history=history_text(ctx, before), attributes=describe(attrs, schema))
    return ItemQuery("UQ2I", query, (target,), tuple(negs), tuple(attrs), tuple(before), k)


GENERATORS: dict[str, Callable[[TaskContext, random.Random], ItemQuery | None]] = {
    "UH2I": uh2i, "I2I": i2i, "US2I": us2i, "FA2I": fa2i, "SA2I": sa2i,
    "AS2I": as2i, "NM2I": nm2i, "VC2I": vc2i, "NA2I": na2i, "UQ2I": uq2i,
}  # fmt: skip
assert tuple(GENERATORS) == TASKS


def generate(
    task: str, ctx: TaskContext, n: int, seed: int = 0, max_tries: int | None = None
) -> list[ItemQuery]:
    """Up to n distinct queries of one task (the same seed gives the same list).

    Args:
        task: A task code.
        ctx: The split's context.
        n: How many queries.
        seed: The random seed (combined with the task's index).
        max_tries: Draws before giving up (default 20 n).

    Returns:
        The queries, each with `ctx.n_negatives` negatives; duplicate query texts dropped.
    """
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    rng = random.Random(seed * 1000 + TASKS.index(task))
    out: dict[str, ItemQuery] = {}
    for _ in range(max_tries or 20 * n):
        if len(out) >= n:
            break
        q = GENERATORS[task](ctx, rng)
        if q is not None and len(q.negatives) == ctx.n_negatives and q.query not in out:
            out[q.query] = q
    return list(out.values())
