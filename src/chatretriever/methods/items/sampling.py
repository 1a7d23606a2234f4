"""The pieces the item-query generators share: the query record, the context they draw from,
item co-occurrence, attribute sampling and narrowing, negatives that violate a query, and the
text of constraints.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chatretriever.io.reclm import UserHistory
from chatretriever.methods.items.catalog import Constraint, ItemCatalog, field_values
from chatretriever.methods.items.schema import STEAM_SCHEMA, CatalogSchema
from chatretriever.methods.items.templates import templates_for

_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")  # fmt: skip


@dataclass(frozen=True)
class ItemQuery:
    """One generated query.

    Attributes:
        task: The task code ("UH2I", ...).
        query: The query text.
        positives: Target item ids (all relevant; the first is the one a training example uses).
        negatives: Item ids that violate the query (7 by default).
        constraints: The query's conditions on item metadata (empty for pure behaviour tasks).
        exclude: Item ids masked out of the ranking (the history; the source item for I2I).
        template: Index of the template in `templates_for(task, split)`.
    """

    task: str
    query: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...]
    constraints: tuple[Constraint, ...] = ()
    exclude: tuple[str, ...] = ()
    template: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "query": self.query,
            "positives": list(self.positives),
            "negatives": list(self.negatives),
            "constraints": [c.to_dict() for c in self.constraints],
            "exclude": list(self.exclude),
            "template": self.template,
        }


@dataclass
class TaskContext:
    """What the generators draw from, for one split.

    Attributes:
        catalog: The items.
        histories: The split's users (items oldest first; only items of the catalog).
        cooccurrence: item id -> [(co-occurring item id, sim)], best first (from training users).
        split: "train" (random cut points in histories) or "test" (leave-last-out).
        max_history: Most titles in a history query.
        max_targets: Most items an attribute query may match.
        n_negatives: Negatives per query.
    """

    catalog: ItemCatalog
    histories: Sequence[UserHistory]
    cooccurrence: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    split: str = "train"
    max_history: int = 20
    max_targets: int = 100
    n_negatives: int = 7


def cooccurrence(histories: Sequence[UserHistory]) -> dict[str, list[tuple[str, float]]]:
    """Item-item similarity from histories: sim = freq / (sqrt(deg_i deg_j) + 10).

    freq = users whose history holds both items; deg = users whose history holds the item.

    Returns:
        item id -> [(other item id, sim)] best first (ties by id).
    """
    deg: dict[str, int] = {}
    freq: dict[tuple[str, str], int] = {}
    for h in histories:
        items = sorted(set(h.items))
        for i, a in enumerate(items):
            deg[a] = deg.get(a, 0) + 1
            for b in items[i + 1 :]:
                freq[(a, b)] = freq.get((a, b), 0) + 1
    out: dict[str, list[tuple[str, float]]] = {}
    for (a, b), f in freq.items():
        sim = f / (np.sqrt(deg[a] * deg[b]) + 10.0)
        out.setdefault(a, []).append((b, sim))
        out.setdefault(b, []).append((a, sim))
    return {k: sorted(v, key=lambda x: (-x[1], x[0])) for k, v in out.items()}


def pick_template(ctx: TaskContext, rng: random.Random, task: str) -> tuple[int, str]:
    schema = ctx.catalog.schema
    options = templates_for(task, ctx.split, schema.noun, schema.plural)
    i = rng.randrange(len(options))
    return i, options[i]


def sample_ids(
    ctx: TaskContext, rng: random.Random, pool: np.ndarray, avoid: set[str], n: int
) -> list[str]:
    """Up to n distinct ids of the (N,) bool `pool`, none in `avoid`, in random order."""
    idx = np.flatnonzero(pool)
    out: list[str] = []
    for j in rng.sample(range(len(idx)), min(len(idx), n + len(avoid))):
        item = ctx.catalog.ids[idx[j]]
        if item not in avoid:
            out.append(item)
            if len(out) == n:
                break
    return out


def violators(
    ctx: TaskContext, rng: random.Random, constraints: Sequence[Constraint], avoid: set[str]
) -> list[str] | None:
    """`n_negatives` items that fail at least one constraint; each tries to fail just one
    (a near miss), else any. None when too few exist."""
    cat, out = ctx.catalog, []
    violating = ~cat.matching(constraints)
    taken = set(avoid)
    for _ in range(ctx.n_negatives):
        j = rng.randrange(len(constraints))
        others = [c for k, c in enumerate(constraints) if k != j]
        near = cat.matching(others) & ~cat.mask(constraints[j])
        got = sample_ids(ctx, rng, near, taken, 1) or sample_ids(ctx, rng, violating, taken, 1)
        if not got:
            return None
        out.append(got[0])
        taken.add(got[0])
    return out


def sample_attributes(
    rng: random.Random,
    meta: dict[str, Any],
    fields: Sequence[str],
    n_fields: int,
    n_values: int,
    list_fields: Sequence[str],
) -> list[Constraint]:
    """`has` constraints on up to n_fields fields of an item, up to n_values values for each of
    the `list_fields` (one value for any other field)."""
    present = [f for f in fields if field_values(meta, f)]
    chosen = rng.sample(present, min(n_fields, len(present)))
    out = []
    for f in sorted(chosen, key=fields.index):
        values = field_values(meta, f)
        k = rng.randint(1, min(n_values, len(values))) if f in list_fields else 1
        out += [Constraint(f, "has", v) for v in rng.sample(values, k)]
    return out


def narrow(
    ctx: TaskContext, rng: random.Random, meta: dict[str, Any], constraints: list[Constraint]
) -> list[Constraint] | None:
    """Add the item's own list-field values (tags, genres, details) until at most
    `max_targets` items match."""
    spare = [
        Constraint(f, "has", v)
        for f in ctx.catalog.schema.list_fields
        for v in field_values(meta, f)
        if Constraint(f, "has", v) not in constraints
    ]
    rng.shuffle(spare)
    while int(ctx.catalog.matching(constraints).sum()) > ctx.max_targets:
        if not spare:
            return None
        constraints = [*constraints, spare.pop()]
    return constraints


def describe(constraints: Sequence[Constraint], schema: CatalogSchema = STEAM_SCHEMA) -> str:
    """Constraints as query text: "tags: a, b; developer: X; price below $10; ..." (fields
    by the schema's display names)."""
    has: dict[str, list[str]] = {}
    lacks: dict[str, list[str]] = {}
    rest = []
    for c in constraints:
        if c.op in ("has", "lacks"):
            (has if c.op == "has" else lacks).setdefault(c.field, []).append(c.value)
        else:
            rest.append(_condition_text(c, schema))
    parts = [f"{schema.label(f)}: {', '.join(v)}" for f, v in has.items()]
    parts += [f"not including {schema.label(f)}: {', '.join(v)}" for f, v in lacks.items()]
    return "; ".join(parts + rest)


def _condition_text(c: Constraint, schema: CatalogSchema) -> str:
    if c.op.startswith("price"):
        return f"{schema.label(c.field)} {c.op.removeprefix('price_')} ${c.value}"
    when = c.value
    if len(when) == 7:
        when = f"{_MONTHS[int(when[5:]) - 1]} {when[:4]}"
    return f"released {c.op.removeprefix('released_')} {when}"


def ids_of(ctx: TaskContext, mask: np.ndarray) -> tuple[str, ...]:
    return tuple(ctx.catalog.ids[i] for i in np.flatnonzero(mask))


def history_cut(ctx: TaskContext, rng: random.Random) -> tuple[UserHistory, list[str], str] | None:
    """A user, the items before the target (oldest first) and the target: the last item on
    the test split (leave-last-out), a random later item in training. None when the split has
    no users or the drawn user has a single item (nothing comes before the target)."""
    if not ctx.histories:
        return None
    user = ctx.histories[rng.randrange(len(ctx.histories))]
    if len(user.items) < 2:
        return None
    t = len(user.items) - 1 if ctx.split == "test" else rng.randint(1, len(user.items) - 1)
    return user, list(user.items[:t]), user.items[t]


def history_text(ctx: TaskContext, items: Sequence[str]) -> str:
    newest = list(reversed(items))[: ctx.max_history]
    return ", ".join(ctx.catalog.item(i).title for i in newest)


def outside(ctx: TaskContext, ids: set[str]) -> np.ndarray:
    out = np.ones(len(ctx.catalog), dtype=bool)
    out[[ctx.catalog.position[i] for i in ids]] = False
    return out
