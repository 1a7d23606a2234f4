"""The scores of benchmarks/rag.py: each system's retrieval and generation metrics and
consistency, and the paired tests of each row against a baseline row."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from _rag.report import MEASURES
from _rag.systems import RagSystem
from _rag.workspace import RagWorkspace
from chatretriever.types import Run


def evaluate_system(
    system: RagSystem, run: Run | None, answers: Mapping[str, str], ws: RagWorkspace
) -> dict[str, Any]:
    """Retrieval metrics (dense and BM25 rows), generation metrics and consistency."""
    from chatretriever.retrieval.evaluate import evaluate_run
    from chatretriever.retrieval.generation_eval import consistency, score_answers, summarize

    scores = score_answers(answers, {s.id: s.response for s in ws.sessions})
    generation = summarize(scores)
    metrics: dict[str, float | None] = dict.fromkeys(MEASURES)
    metrics.update({"F1": generation["f1"], "ROUGE-L": generation["rouge_l"]})
    record: dict[str, Any] = {"metrics": metrics, "n": generation["n"], "consistency": None}
    # per turn, for the paired tests against the baseline row (`paired_tests`)
    record["per_turn"] = {"F1": {q: v["f1"] for q, v in scores.items()}}
    if run is not None and system.retrieval in ("dense", "bm25") and ws.judged:
        ev = evaluate_run(run, ws.judged, MEASURES)
        metrics.update(ev.aggregate)
        record["n_judged"] = ev.num_queries
        record["per_turn"]["nDCG@3"] = {q: v["nDCG@3"] for q, v in ev.per_query.items()}
        judged_scores = {q: v for q, v in scores.items() if q in ws.judged}
        record["consistency"] = consistency(judged_scores, run.scores, ws.judged, ws.args.k)
    return record


BASELINE_ROW = "decoupled"  # the paired tests compare every row with it


def paired_tests(
    records: Sequence[Mapping[str, Any]],
    baseline: str,
    key: str = "paired",
    rows: Collection[str] | None = None,
) -> str | None:
    """Adds to each record (of `rows` ids, default all) `key`: measure -> {"diff", "p", "n"}
    against the baseline row, over the turns both scored (paired randomisation test, 10,000
    sign flips). Returns the baseline's id, or None when it was not run."""
    import numpy as np

    from chatretriever.retrieval.evaluate import randomization_test

    base = next((r for r in records if r["id"] == baseline), None)
    if base is None:
        return None
    for r in records:
        if rows is not None and r["id"] not in rows:
            continue
        r[key] = {}
        for measure, values in r["per_turn"].items():
            other = base["per_turn"].get(measure)
            if r is base or other is None:
                continue
            qids = sorted(set(values) & set(other))
            diff = np.array([values[q] - other[q] for q in qids])
            r[key][measure] = {
                "diff": float(diff.mean()) if qids else 0.0,
                "p": randomization_test(diff),
                "n": len(qids),
            }
    return baseline
