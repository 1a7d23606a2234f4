"""Run fusion: reciprocal rank fusion and normalised linear fusion of two or more runs.

Hybrid retrieval fuses the session-dense run with a BM25 run of the same queries:

- reciprocal rank fusion (Cormack et al., 2009): score(d) = sum_r w_r / (k + rank_r(d)), ranks
  1-based in each run's own order (ties broken by (-score, docid), as everywhere here);
- linear fusion: each run's scores are min-max normalised per query into [0, 1], then
  score(d) = sum_r w_r * norm_r(d); a document a run did not retrieve counts 0 there (the
  normalised score of that run's worst hit). A query whose hits all share one score gets 1.0
  for each of them (they are equally the best that run found).

Both make exact ties by construction (with equal weights, the dense run's top hit and BM25's
score alike when neither run retrieved the other's: 0.5 each in linear fusion; so do a
dense-only and a BM25-only hit at the same rank under RRF). The passage id would then decide
their order, which no run says anything about. Instead an exact tie goes to the document the
first run (the dense one in a hybrid) ranks higher, then the second, ..., then the id; the
fused scores are made strictly decreasing in that order (a tied score moves down by a few
units in the last place, `math.nextafter`), so the run file, `evaluate` and trec_eval all read
the same ranking.

Stdlib only (torch-free). `ranx` implements the same formulas but pulls in numba, ir_datasets
and fastparquet; these few lines are tested against rankings worked out by hand instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from chatretriever.types import Run

FUSION_METHODS = ("rrf", "linear")
DEFAULT_RRF_K = 60
TIE_RULE = "first run's order, then id"  # `_untied`


@dataclass(frozen=True)
class FusionConfig:
    """How a dense run and a BM25 run become one.

    Attributes:
        method: "rrf" (reciprocal rank fusion) or "linear" (min-max normalised scores).
        rrf_k: The k of RRF (60 in the original paper; larger = flatter rank weights).
        weight: The dense run's weight in [0, 1]; BM25 gets 1 - weight. RRF weights the
            reciprocal ranks with the same pair (0.5: both count equally).
        depth: Only each run's top `depth` hits are fused (None: all it holds).
    """

    method: str = "rrf"
    rrf_k: int = DEFAULT_RRF_K
    weight: float = 0.5
    depth: int | None = None

    def __post_init__(self) -> None:
        if self.method not in FUSION_METHODS:
            raise ValueError(f"fusion method must be one of {FUSION_METHODS}, got {self.method!r}")
        if self.rrf_k < 0:
            raise ValueError(f"rrf_k must be >= 0, got {self.rrf_k}")
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"the fusion weight must be in [0, 1], got {self.weight}")
        if self.depth is not None and self.depth < 1:
            raise ValueError(f"fusion depth must be >= 1, got {self.depth}")

    def to_dict(self) -> dict[str, Any]:
        """The settings, and how exact ties are ordered (recorded with every fused run: runs
        fused before this rule broke ties by passage id)."""
        return {**asdict(self), "ties": TIE_RULE}


def _top(run: Run, query_id: str, depth: int | None) -> list[tuple[str, float]]:
    """(doc id, score) of one query, best first, cut to `depth`."""
    return [(d.doc_id, d.score) for d in run.ranked(query_id)][:depth]


def _weights(runs: Sequence[Run], weights: Sequence[float] | None) -> list[float]:
    if not runs:
        raise ValueError("fusion needs at least one run")
    for i, run in enumerate(runs):
        if not isinstance(run, Run):
            raise TypeError(
                f"runs[{i}] must be a Run (Run(scores, name): query id -> doc id -> score), "
                f"got a {type(run).__name__}"
            )
    out = [1.0] * len(runs) if weights is None else [float(w) for w in weights]
    if len(out) != len(runs) or any(w < 0 for w in out):
        raise ValueError(f"need one non-negative weight per run, got {weights} for {len(runs)}")
    return out


def _queries(runs: Sequence[Run]) -> list[str]:
    return sorted({q for r in runs for q in r.scores})


def _untied(fused: Mapping[str, float], ranks: Sequence[Mapping[str, int]]) -> dict[str, float]:
    """`fused` made strictly decreasing in the order (-score, rank in each run in turn, id).

    Args:
        fused: Document -> fused score of one query.
        ranks: Per run, document -> its 1-based rank there (a document a run did not
            retrieve ranks after all of that run's).

    Returns:
        The same documents, best first, each tied score lowered just below the one before.
    """
    order = sorted(fused, key=lambda d: (-fused[d], *[r.get(d, math.inf) for r in ranks], d))
    out: dict[str, float] = {}
    before = math.inf
    for doc in order:
        score = fused[doc] if fused[doc] < before else math.nextafter(before, -math.inf)
        out[doc] = before = score
    return out


def reciprocal_rank_fusion(
    runs: Sequence[Run],
    k: int = DEFAULT_RRF_K,
    weights: Sequence[float] | None = None,
    depth: int | None = None,
    name: str | None = None,
) -> Run:
    """Fuse runs by weighted reciprocal rank: score(d) = sum_r w_r / (k + rank_r(d)).

    Args:
        runs: The runs (any number; queries missing from a run get nothing from it).
        k: The RRF constant.
        weights: One weight per run (default 1 each).
        depth: Use only each run's top `depth` hits.
        name: The fused run's name (default "rrf(<names>)").

    Returns:
        The fused Run over the union of the runs' queries.
    """
    ws = _weights(runs, weights)
    scores: dict[str, dict[str, float]] = {}
    for qid in _queries(runs):
        fused: dict[str, float] = {}
        ranks = [_ranks(run, qid, depth) for run in runs]
        for ranked, w in zip(ranks, ws, strict=True):
            for doc, rank in ranked.items():
                fused[doc] = fused.get(doc, 0.0) + w / (k + rank)
        scores[qid] = _untied(fused, ranks)
    return Run(scores, name or f"rrf({'+'.join(r.name for r in runs)})")


def _ranks(run: Run, query_id: str, depth: int | None) -> dict[str, int]:
    """Document -> its 1-based rank in `run` for one query, down to `depth`."""
    return {doc: rank for rank, (doc, _) in enumerate(_top(run, query_id, depth), start=1)}


def min_max(scores: Mapping[str, float]) -> dict[str, float]:
    """Scores scaled into [0, 1] by (s - min) / (max - min); all equal -> 1.0 each."""
    if not scores:
        return {}
    lo, hi = min(scores.values()), max(scores.values())
    if hi == lo:
        return dict.fromkeys(scores, 1.0)
    return {d: (s - lo) / (hi - lo) for d, s in scores.items()}


def linear_fusion(
    runs: Sequence[Run],
    weights: Sequence[float] | None = None,
    depth: int | None = None,
    name: str | None = None,
) -> Run:
    """Fuse runs by a weighted sum of per-query min-max normalised scores.

    Args:
        runs: The runs.
        weights: One weight per run (default 1 each).
        depth: Normalise and fuse only each run's top `depth` hits.
        name: The fused run's name (default "linear(<names>)").

    Returns:
        The fused Run over the union of the runs' queries (a document missing from a run
        gets 0 from it).
    """
    ws = _weights(runs, weights)
    scores: dict[str, dict[str, float]] = {}
    for qid in _queries(runs):
        fused: dict[str, float] = {}
        tops = [_top(run, qid, depth) for run in runs]
        for top, w in zip(tops, ws, strict=True):
            for doc, s in min_max(dict(top)).items():
                fused[doc] = fused.get(doc, 0.0) + w * s
        ranks = [{doc: rank for rank, (doc, _) in enumerate(top, start=1)} for top in tops]
        scores[qid] = _untied(fused, ranks)
    return Run(scores, name or f"linear({'+'.join(r.name for r in runs)})")


def fuse_runs(dense: Run, sparse: Run, config: FusionConfig | None = None) -> Run:
    """The hybrid run: `dense` weighted `config.weight`, `sparse` (BM25) 1 - weight.

    Args:
        dense: The dense (session) run.
        sparse: The BM25 run of the same queries.
        config: The fusion settings (default: RRF, k 60, equal weights).

    Returns:
        The fused Run, named "<dense>+<sparse>.<method>".
    """
    cfg = config or FusionConfig()
    weights = _weights([dense, sparse], (cfg.weight, 1.0 - cfg.weight))  # checks their types
    name = f"{dense.name}+{sparse.name}.{cfg.method}"
    if cfg.method == "rrf":
        return reciprocal_rank_fusion([dense, sparse], cfg.rrf_k, weights, cfg.depth, name)
    return linear_fusion([dense, sparse], weights, cfg.depth, name)
