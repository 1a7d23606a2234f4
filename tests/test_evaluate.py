from __future__ import annotations

import json
import math

import numpy as np
import pytest

from chatretriever.io.trec import read_qrels, read_run
from chatretriever.retrieval.evaluate import (
    compare,
    evaluate_run,
    parse_measures,
    randomization_test,
    write_json,
)
from chatretriever.types import Run

pytest.importorskip("ir_measures")

QRELS = """\
q1 0 d1 1
q1 0 d2 2
q1 0 d3 0
q2 0 d4 1
q3 0 d5 1
"""
# q1: d1 and d2 tie; q2: d4 and d9 tie (trec_eval itself would put d9 first); q3 is judged but
# missing from the run; q4 has no judgments.
RUN = """\
q1 Q0 d3 1 5.0 r
q1 Q0 d1 2 3.0 r
q1 Q0 d2 3 3.0 r
q2 Q0 d9 1 2.0 r
q2 Q0 d4 2 2.0 r
q4 Q0 d1 1 1.0 r
"""
LOG3 = math.log2(3)


@pytest.fixture
def data(tmp_path):
    (tmp_path / "qrels.txt").write_text(QRELS)
    (tmp_path / "run.trec").write_text(RUN)
    return read_run(tmp_path / "run.trec"), read_qrels(tmp_path / "qrels.txt")


def test_values_worked_out_by_hand(data):
    run, qrels = data
    ev = evaluate_run(run, qrels, ["nDCG@3", "nDCG@10", "RR@10", "R@10", "AP"])
    # q1 ranking (ties by doc id): d3 (0), d1 (1), d2 (2)
    ndcg_q1 = (1 / LOG3 + 2 / 2) / (2 + 1 / LOG3)
    assert ev.per_query["q1"]["nDCG@3"] == pytest.approx(ndcg_q1)
    assert ev.per_query["q1"]["RR@10"] == pytest.approx(0.5)
    assert ev.per_query["q1"]["AP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert ev.per_query["q2"]["RR@10"] == 1.0  # d4 before d9: the run file's order
    assert ev.per_query["q3"] == dict.fromkeys(["nDCG@3", "nDCG@10", "RR@10", "R@10", "AP"], 0.0)
    assert ev.aggregate["nDCG@3"] == pytest.approx((ndcg_q1 + 1 + 0) / 3)
    assert ev.aggregate["RR@10"] == pytest.approx(0.5)
    assert ev.aggregate["R@10"] == pytest.approx(2 / 3)
    assert (ev.num_queries, ev.missing_from_run, ev.unjudged_in_run) == (3, ["q3"], ["q4"])


def test_relevance_threshold_of_binary_measures(data):
    run, qrels = data
    ev = evaluate_run(run, qrels, ["RR@10", "nDCG@3"], rel=2)
    assert list(ev.aggregate) == ["RR(rel=2)@10", "nDCG@3"]
    assert ev.per_query["q1"]["RR(rel=2)@10"] == pytest.approx(1 / 3)  # only d2 counts
    assert ev.per_query["q2"]["RR(rel=2)@10"] == 0.0
    ndcg_q1 = (1 / LOG3 + 2 / 2) / (2 + 1 / LOG3)
    assert ev.per_query["q1"]["nDCG@3"] == pytest.approx(ndcg_q1)  # graded, unaffected


def test_evaluating_twice_gives_the_same_numbers(data):
    # pytrec_eval < 0.5.4 returned zeros for the second of several cutoffs on a reused evaluator
    run, qrels = data
    measures = ["nDCG@3", "nDCG@10", "R@10", "R@100", "RR@10"]
    first = evaluate_run(run, qrels, measures)
    second = evaluate_run(run, qrels, measures)
    assert first.per_query == second.per_query
    assert first.aggregate["nDCG@10"] > 0 and first.aggregate["R@100"] > 0


def test_mrr_alias_and_unknown_measures():
    assert [str(m) for m in parse_measures(["MRR@10", "R@100"])] == ["RR@10", "R@100"]
    with pytest.raises(ValueError, match="unknown measure"):
        parse_measures(["NotAMeasure@3"])


def test_to_dict_states_the_query_set(data, tmp_path):
    run, qrels = data
    ev = evaluate_run(run, qrels)
    write_json(tmp_path / "eval.json", ev.to_dict())
    back = json.loads((tmp_path / "eval.json").read_text())
    assert back["num_queries"] == 3
    assert back["num_missing_from_run"] == 1 and back["num_unjudged_in_run"] == 1
    assert set(back["aggregate"]) == {"nDCG@3", "nDCG@10", "RR@10", "R@10", "R@100", "AP"}
    assert "per_query" not in ev.to_dict(per_query=False)


def _run(ranks: dict[str, list[str]]) -> Run:
    return Run({q: {d: float(len(ds) - i) for i, d in enumerate(ds)} for q, ds in ranks.items()})


def test_compare_paired_tests():
    qrels = {f"q{i}": {"good": 1} for i in range(12)}
    base = _run({f"q{i}": ["bad", "good"] for i in range(12)})  # RR 0.5 everywhere
    better = _run({f"q{i}": ["good", "bad"] if i < 10 else ["bad", "good"] for i in range(12)})
    a, b = evaluate_run(base, qrels, ["RR@10"]), evaluate_run(better, qrels, ["RR@10"])
    t = compare(a, b, n_resamples=5000)["RR@10"]
    assert (t["a"], t["b"], t["num_queries"]) == (0.5, pytest.approx(11 / 12), 12)
    from scipy import stats

    x = [a.per_query[q]["RR@10"] for q in sorted(qrels)]
    y = [b.per_query[q]["RR@10"] for q in sorted(qrels)]
    assert t["t_test_p"] == pytest.approx(stats.ttest_rel(y, x).pvalue)
    assert t["randomization_p"] < 0.01  # exact: 2 * 3 / 4096 (sign flips of ten 0.5s)
    same = compare(a, a)["RR@10"]
    assert same["t_test_p"] == 1.0 and same["randomization_p"] == 1.0


def test_compare_needs_the_same_queries(data):
    run, qrels = data
    a = evaluate_run(run, qrels)
    b = evaluate_run(run, [q for q in qrels if q.query_id != "q3"])
    with pytest.raises(ValueError, match="different queries"):
        compare(a, b)


def test_randomization_test_matches_exact_enumeration():
    diff = np.array([0.3, -0.1, 0.2, 0.4, 0.0, 0.25])
    signs = np.array(np.meshgrid(*[[-1, 1]] * 6)).reshape(6, -1).T  # all 64 sign vectors
    exact = np.mean(np.abs(signs @ diff) >= abs(diff.sum()) - 1e-12)
    assert randomization_test(diff, 20_000, seed=1) == pytest.approx(exact, abs=0.02)
