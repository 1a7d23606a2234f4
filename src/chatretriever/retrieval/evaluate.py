"""Evaluate runs with ir_measures (pytrec_eval inside) and compare two runs per query. Torch-free.

The evaluated query set is explicit, and evaluation never fails silently:
- a run and qrels that share no query id raise `NoCommonQueriesError` (scoring them would give
  0.0 for every measure);
- queries of the run without judgments are excluded (and listed);
- judged queries missing from the run count as zero (and are listed), as ir_measures' pytrec_eval
  provider and `trec_eval -c` do (plain trec_eval averages over the run's queries only);
- judged queries without any judgment at or above the relevance threshold `rel` (e.g. only
  rel=0 labels) score zero on the binary measures (and on every measure when no label is above
  0) whatever the run does; they are listed and, with `drop_no_relevant=True`, left out of the
  means instead of averaged in as zeros.
Ties are broken by (-score, docid) as in the run files this package writes (trec_eval itself would
order tied documents by doc id descending).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chatretriever.errors import require_extra
from chatretriever.io.atomic import atomic_write
from chatretriever.types import Qrel, Run, batch, qrels_to_dict, rank_key

logger = logging.getLogger(__name__)

DEFAULT_MEASURES = ("nDCG@3", "nDCG@10", "RR@10", "R@10", "R@100", "AP")


SHOWN_IDS = 5  # query ids named in log lines and error messages


class NoCommonQueriesError(ValueError):
    """The run has results for none of the judged queries: every measure would be 0.0."""


def _ir_measures():
    return require_extra("ir_measures", "eval", "evaluation")


def _some(ids: Iterable[str]) -> str:
    """A few ids for a message: "'a', 'b', ... (12 in all)"."""
    ids = sorted(ids)
    shown = ", ".join(repr(i) for i in ids[:SHOWN_IDS])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > SHOWN_IDS else "")


@dataclass
class Evaluation:
    """Scores of one run.

    Attributes:
        aggregate: Measure name -> mean over the evaluated queries.
        per_query: Query id -> measure name -> value (every evaluated query).
        rel: Minimum relevance counted as relevant by binary measures (RR, R, AP).
        unjudged_in_run: Run queries without judgments (excluded).
        missing_from_run: Evaluated queries the run has no results for (counted as zero).
        no_relevant: Judged queries whose judgments are all below `rel` (binary measures are
            zero for them whatever the run); evaluated unless `no_relevant_dropped`.
        no_relevant_dropped: Whether the `no_relevant` queries were left out of the means.
        run_name: The run's name.
    """

    aggregate: dict[str, float]
    per_query: dict[str, dict[str, float]]
    rel: int = 1
    unjudged_in_run: list[str] = field(default_factory=list)
    missing_from_run: list[str] = field(default_factory=list)
    run_name: str = ""
    no_relevant: list[str] = field(default_factory=list)
    no_relevant_dropped: bool = False

    @property
    def num_queries(self) -> int:
        return len(self.per_query)

    def to_dict(self, per_query: bool = True) -> dict[str, Any]:
        out = asdict(self)
        out["num_queries"] = self.num_queries
        out["num_unjudged_in_run"] = len(self.unjudged_in_run)
        out["num_missing_from_run"] = len(self.missing_from_run)
        out["num_no_relevant"] = len(self.no_relevant)
        if not per_query:
            del out["per_query"]
        return out


def parse_measures(names: Iterable[str], rel: int = 1) -> list[Any]:
    """ir_measures measures from their names ("nDCG@3", "RR@10", "MRR@10", "AP", ...).

    Args:
        names: Measure names in ir_measures syntax; "MRR@k" is accepted as RR@k.
        rel: Relevance threshold given to every measure that takes one (RR, R, AP, P, ...);
            nDCG always uses the graded labels.

    Returns:
        Measure objects, in the given order.
    """
    irm = _ir_measures()
    out = []
    for name in batch(names, "measures", "measure names"):
        if name.upper().startswith("MRR"):
            name = name[1:]
        try:
            m = irm.parse_measure(name)
        except (ValueError, NameError, TypeError) as e:
            raise ValueError(f"unknown measure {name!r}: {e}") from None
        if rel != 1 and "rel" in m.SUPPORTED_PARAMS and "rel" not in m.params:
            m = m(rel=rel)
        out.append(m)
    return out


def _label(name: str, measure: Any) -> str:
    """The key a measure is reported under: "MRR@k" as asked (ir_measures calls it RR@k);
    otherwise ir_measures' name of what was computed (with a `--rel` other than 1 in it,
    "RR(rel=2)@10": the name says what the number is)."""
    if name.strip().upper().startswith("MRR") and str(measure).upper() == name.strip()[1:].upper():
        return name.strip()
    return str(measure)


def _untied(run: Run, query_ids: Iterable[str]) -> dict[str, dict[str, float]]:
    """Scores replaced by (len - rank) so evaluation sees exactly the (-score, docid) order."""
    out: dict[str, dict[str, float]] = {}
    for qid in query_ids:
        docs = sorted(run.scores[qid].items(), key=lambda kv: rank_key(kv[0], kv[1]))
        out[qid] = {d: float(len(docs) - r) for r, (d, _) in enumerate(docs)}
    return out


def evaluate_run(
    run: Run,
    qrels: Sequence[Qrel] | Mapping[str, Mapping[str, int]],
    measures: Sequence[str] = DEFAULT_MEASURES,
    rel: int = 1,
    drop_no_relevant: bool = False,
) -> Evaluation:
    """Score a run against graded judgments.

    Args:
        run: The run (query id -> doc id -> score).
        qrels: Judgments as Qrel records or query id -> doc id -> relevance.
        measures: Measure names (see `parse_measures`).
        rel: Relevance threshold of binary measures, and of "has a relevant passage".
        drop_no_relevant: Leave judged queries without any judgment >= `rel` out of the means
            (default: they count, as zeros, and are reported in `Evaluation.no_relevant`).

    Returns:
        Per-query values and their means over the evaluated queries: every judged query (those
        missing from the run count as zero), less the no-relevant ones when dropped.

    Raises:
        NoCommonQueriesError: The run has results for none of the judged queries (a run of
            another dataset, or query ids spelled differently).
        ValueError: `drop_no_relevant` drops every judged query.
    """
    irm = _ir_measures()
    qrels_dict = qrels if isinstance(qrels, Mapping) else qrels_to_dict(qrels)
    qrels_dict = {q: dict(d) for q, d in qrels_dict.items() if d}
    given = batch(measures, "measures", "measure names")
    parsed = parse_measures(given, rel)
    names = [_label(name, m) for name, m in zip(given, parsed, strict=True)]
    labels: dict[str, list[str]] = {}
    for name, m in zip(names, parsed, strict=True):
        labels.setdefault(str(m), []).append(name)
    _check_common_queries(run, qrels_dict)
    no_relevant = sorted(q for q, d in qrels_dict.items() if max(d.values()) < rel)
    dropped = set(no_relevant) if drop_no_relevant else set()
    judged = sorted(q for q in qrels_dict if q not in dropped)
    if not judged:  # every judged query dropped: a mean over nothing is no result
        raise ValueError(
            f"every one of the {len(no_relevant)} judged queries has no judgment >= {rel} "
            f"(e.g. {no_relevant[0]!r}), so drop_no_relevant leaves nothing to evaluate: "
            "is the relevance threshold (--rel) above the qrels' grades?"
        )
    in_run = [q for q in judged if run.scores.get(q)]
    unjudged = sorted(q for q in run.scores if q not in qrels_dict)
    missing = sorted(set(judged) - set(in_run))
    per_query = {q: dict.fromkeys(names, 0.0) for q in judged}
    # pytrec_eval (trec_eval) when it covers every measure, else ir_measures picks providers.
    provider = irm.pytrec_eval if all(irm.pytrec_eval.supports(m) for m in parsed) else irm
    # A new evaluator on every call: a reused pytrec_eval evaluator can return zeros.
    judged_in_run = {q: qrels_dict[q] for q in in_run}
    for metric in provider.iter_calc(parsed, judged_in_run, _untied(run, in_run)):
        if metric.query_id in per_query:
            for name in labels.get(str(metric.measure), ()):
                per_query[metric.query_id][name] = float(metric.value)
    aggregate = {n: _mean([v[n] for v in per_query.values()]) for n in names}
    _log_query_set(unjudged, missing, no_relevant, rel, drop_no_relevant)
    _warn_no_judged_passage(run, judged_in_run)
    return Evaluation(
        aggregate, per_query, rel, unjudged, missing, run.name, no_relevant, drop_no_relevant
    )


def _check_common_queries(run: Run, qrels: Mapping[str, Mapping[str, int]]) -> None:
    """Raise NoCommonQueriesError when no judged query has results in the run."""
    if any(run.scores.get(q) for q in qrels):
        return
    if not qrels:
        raise NoCommonQueriesError("the qrels hold no judgments: nothing to evaluate")
    ran = [q for q, docs in run.scores.items() if docs]
    if not ran:
        raise NoCommonQueriesError(f"the run {run.name!r} has no results: nothing to evaluate")
    raise NoCommonQueriesError(
        f"the run and the qrels share no query id (run: {_some(ran)}; qrels: {_some(qrels)}): "
        "is the run of another dataset, or are its query ids spelled differently?"
    )


def _warn_no_judged_passage(run: Run, qrels: Mapping[str, Mapping[str, int]]) -> None:
    """Warn when the run retrieved no judged passage at all for the evaluated queries: every score
    is then 0, most likely because the run searched another corpus or its passage ids are
    spelled otherwise than the qrels'."""
    retrieved = [d for q in qrels for d in run.scores[q]]
    if not retrieved or any(d in qrels[q] for q in qrels for d in run.scores[q]):
        return
    logger.warning(
        "the run retrieved none of the judged passages of its %d evaluated queries, so every "
        "score is 0: did it search another corpus, or are its passage ids spelled otherwise? "
        "(run: %s; qrels: %s)",
        len(qrels),
        _some(sorted(set(retrieved))),
        _some(sorted({d for docs in qrels.values() for d in docs})),
    )


def _log_query_set(
    unjudged: list[str], missing: list[str], no_relevant: list[str], rel: int, dropped: bool
) -> None:
    # at DEBUG: `Evaluation` carries both lists and the CLI prints their counts in its summary
    if unjudged:
        logger.debug("%d run queries have no judgments and are not evaluated", len(unjudged))
    if missing:
        logger.debug("%d judged queries are missing from the run: counted as 0", len(missing))
    if no_relevant:
        logger.warning(
            "%d judged queries have no judgment >= %d (%s): %s",
            len(no_relevant),
            rel,
            _some(no_relevant),
            "left out (drop_no_relevant)" if dropped else "evaluated (binary measures are 0)",
        )


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def compare(
    a: Evaluation, b: Evaluation, n_resamples: int = 10_000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Paired significance tests of b against a over the per-query values of each measure.

    Args:
        a: The baseline evaluation.
        b: The other evaluation, on the same judged queries.
        n_resamples: Random sign flips of the randomisation (permutation) test.
        seed: Seed of the randomisation test.

    Returns:
        Measure -> {"a", "b", "diff", "t_test_p", "randomization_p", "num_queries"}.
    """
    stats = require_extra("scipy.stats", "eval", "significance tests")

    if set(a.per_query) != set(b.per_query):
        raise ValueError("the two evaluations cover different queries: use the same qrels")
    qids = sorted(a.per_query)
    out = {}
    for name in a.aggregate:
        if name not in b.aggregate:
            continue
        x = np.array([a.per_query[q][name] for q in qids])  # (Q,)
        y = np.array([b.per_query[q][name] for q in qids])  # (Q,)
        diff = y - x
        out[name] = {
            "a": float(x.mean()),
            "b": float(y.mean()),
            "diff": float(diff.mean()),
            "t_test_p": _t_test_p(stats, y, x),
            "randomization_p": randomization_test(diff, n_resamples, seed),
            "num_queries": len(qids),
        }
    return out


def _t_test_p(stats: Any, y: np.ndarray, x: np.ndarray) -> float:
    """The paired t-test's p of y against x; the cases it does not cover, said plainly.

    Identical values give 1; fewer than two queries leave no degree of freedom (nan); equal
    differences up to float rounding (e.g. 0.1 and 0.09999999999999998, which scipy would
    turn into p ~ 1e-16) are a constant shift: no variance, p 0.
    """
    diff = y - x
    if not np.any(diff):
        return 1.0
    if diff.size < 2:
        return math.nan
    if np.ptp(diff) <= 1e-12 * max(1.0, float(np.abs(diff).max())):
        return 0.0
    return float(stats.ttest_rel(y, x).pvalue)


def randomization_test(diff: np.ndarray, n_resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided paired randomisation test: p-value of |mean(diff)| under random sign flips.

    Args:
        diff: (Q,) per-query differences between two systems.
        n_resamples: Number of random sign assignments.
        seed: Seed of the random generator.

    Returns:
        (1 + #resamples at least as extreme) / (1 + n_resamples).
    """
    diff = np.asarray(diff, dtype=np.float64)
    if diff.size == 0:
        return 1.0
    observed = abs(diff.mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_resamples, 1000):  # bounded memory: (1000, Q) signs at a time
        signs = rng.choice([-1.0, 1.0], size=(min(1000, n_resamples - start), diff.size))
        hits += int(np.sum(np.abs(signs @ diff) / diff.size >= observed - 1e-12))
    return (hits + 1) / (n_resamples + 1)


def write_json(path: str | Path, obj: Any) -> None:
    """Write results as indented JSON, atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
