"""Item-retrieval metrics at a cutoff k, named plainly (torch-free).

RecLM-emb's code calls two different things "Coverage@k"; here they have two names:
- `precision_at_k` (id tasks): the fraction of the top k that are targets;
- `constraint_coverage_at_k` (attribute tasks): the fraction of the top k whose metadata
  satisfies every constraint of the query.
`hit_at_k`: 1 when any of the top k is a target. A ranking shorter than k counts the missing
places as misses (the denominator is always k). A bare string where ids are expected is a
TypeError, not one id per character.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from chatretriever.methods.items.catalog import Constraint


def _check(ranked: Sequence[str], targets: Any, k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    # a bare id is not a collection of one-character ids (nor `in` a substring test)
    for name, value in (("ranked", ranked), ("targets", targets)):
        if isinstance(value, str):
            raise TypeError(f"{name} must be a collection of item ids, got the string {value!r}")


def hit_at_k(ranked: Sequence[str], targets: Collection[str], k: int) -> float:
    """1.0 when any of the first k ranked ids is a target, else 0.0."""
    _check(ranked, targets, k)
    return float(any(i in targets for i in ranked[:k]))


def precision_at_k(ranked: Sequence[str], targets: Collection[str], k: int) -> float:
    """The fraction of the first k places that hold a target."""
    _check(ranked, targets, k)
    return sum(i in targets for i in ranked[:k]) / k


def constraint_coverage_at_k(
    ranked: Sequence[str],
    constraints: Sequence[Constraint],
    metadata: Mapping[str, Mapping[str, Any]],
    k: int,
) -> float:
    """The fraction of the first k places whose item satisfies every constraint.

    Args:
        ranked: Item ids, best first.
        constraints: The query's constraints (none: every item satisfies them).
        metadata: item id -> its metadata (title included).
        k: The cutoff.
    """
    _check(ranked, constraints, k)
    return sum(all(c.holds(metadata[i]) for c in constraints) for i in ranked[:k]) / k
