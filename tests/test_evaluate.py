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


def test_mrr_is_reported_under_the_name_asked_for(data):
    run, qrels = data
    ev = evaluate_run(run, qrels, ["MRR@10", "RR@10", "nDCG@3"])
    assert list(ev.aggregate) == ["MRR@10", "RR@10", "nDCG@3"]
    assert ev.per_query["q1"]["MRR@10"] == ev.per_query["q1"]["RR@10"] == pytest.approx(0.5)
    assert ev.aggregate["MRR@10"] == ev.aggregate["RR@10"] == pytest.approx(0.5)


def test_evaluating_twice_gives_the_same_numbers(data):
    # pytrec_eval < 0.5.4 returned zeros for the second of several cutoffs on a reused evaluator
    run, qrels = data
    measures = ["nDCG@3", "nDCG@10", "R@10", "R@100", "RR@10"]
    ndcg_q1 = (1 / LOG3 + 2 / 2) / (2 + 1 / LOG3)  # q1 has 3 docs: nDCG@10 = nDCG@3
    by_hand = {"nDCG@3": (ndcg_q1 + 1) / 3, "nDCG@10": (ndcg_q1 + 1) / 3}
    by_hand |= {"R@10": 2 / 3, "R@100": 2 / 3, "RR@10": (1 / 2 + 1) / 3}  # q3 missing: 0
    for _ in range(2):
        assert evaluate_run(run, qrels, measures).aggregate == pytest.approx(by_hand)


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
    # differences: ten 0.5s and two 0s; mean 5/12, sample variance (5/12) / 11, so
    # t = (5/12) / sqrt(5 / 132 / 12) = sqrt(55) with 11 degrees of freedom: p = 1.3325e-5
    assert t["t_test_p"] == pytest.approx(1.3325e-5, rel=1e-3)
    # exact randomisation p: only the 4 of 4096 sign vectors with all ten 0.5s of one sign, times
    # 2 signs, reach |mean| >= 5/12: 8 / 4096; the standard error of a 5000-draw estimate is
    # 6.2e-4, so 1.3e-3 is about 2 sigma
    p = t["randomization_p"]
    assert p == pytest.approx(8 / 4096, abs=1.3e-3)
    # add-one correction (1 + hits) / (1 + 5000): never below 1/5001, and a whole number of 5001ths
    assert p >= 1 / 5001
    assert p * 5001 == pytest.approx(round(p * 5001))
    same = compare(a, a)["RR@10"]
    assert same["t_test_p"] == 1.0 and same["randomization_p"] == 1.0


def test_compare_says_when_the_t_test_does_not_apply():
    """One query: no degree of freedom (nan, not 0). Differences equal up to float rounding
    (0.1 and 0.09999999999999998): a constant shift (p 0), not scipy's p ~ 1e-16 from noise."""
    import math

    from chatretriever.retrieval.evaluate import Evaluation

    def ev(values):
        per_query = {f"q{i}": {"nDCG@3": v} for i, v in enumerate(values)}
        return Evaluation({"nDCG@3": sum(values) / len(values)}, per_query, 1, [], [], "r")

    assert math.isnan(compare(ev([0.0]), ev([1.0]))["nDCG@3"]["t_test_p"])
    assert compare(ev([0.5]), ev([0.5]))["nDCG@3"]["t_test_p"] == 1.0
    shifted = compare(ev([0.2, 0.3]), ev([0.3, 0.4]))["nDCG@3"]  # diffs 0.1, 0.09999999999999998
    assert shifted["t_test_p"] == 0.0
    spread = compare(ev([0.2, 0.3, 0.5]), ev([0.3, 0.5, 0.6]))["nDCG@3"]
    assert 0.0 < spread["t_test_p"] < 1.0


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


def test_a_run_sharing_no_query_with_the_qrels_is_an_error(data):
    run, qrels = data
    other = Run({"x1": {"d1": 1.0}, "x2": {"d2": 1.0}}, name="other")
    with pytest.raises(ValueError, match="share no query id") as err:
        evaluate_run(other, qrels)
    assert "'x1'" in str(err.value) and "'q1'" in str(err.value)  # a few ids of each side
    with pytest.raises(ValueError, match="no results"):
        evaluate_run(Run({}, name="empty"), qrels)
    with pytest.raises(ValueError, match="no judgments"):
        evaluate_run(run, [])
    # one shared query is enough: the others are reported, not an error
    one = evaluate_run(Run({"q2": {"d4": 1.0}, "x1": {"d1": 1.0}}), qrels, ["RR@10"])
    assert one.per_query["q2"]["RR@10"] == 1.0 and one.unjudged_in_run == ["x1"]


NO_RELEVANT_QRELS = QRELS + "q5 0 d1 0\nq5 0 d2 0\n"


def test_queries_without_a_relevant_judgment_are_reported_and_can_be_dropped(
    data, tmp_path, caplog
):
    run, _ = data
    (tmp_path / "qrels5.txt").write_text(NO_RELEVANT_QRELS)
    qrels = read_qrels(tmp_path / "qrels5.txt")
    run = Run({**run.scores, "q5": {"d1": 2.0, "d2": 1.0}})  # retrieves its rel=0 docs only
    ndcg_q1 = (1 / LOG3 + 2 / 2) / (2 + 1 / LOG3)
    with caplog.at_level("WARNING"):
        kept = evaluate_run(run, qrels, ["nDCG@3", "RR@10"])
    assert kept.no_relevant == ["q5"] and not kept.no_relevant_dropped
    assert "1 judged queries have no judgment >= 1 ('q5')" in caplog.text
    assert kept.per_query["q5"] == {"nDCG@3": 0.0, "RR@10": 0.0}  # q1, q2, q3 (0), q5 (0)
    assert kept.aggregate["nDCG@3"] == pytest.approx((ndcg_q1 + 1) / 4)
    dropped = evaluate_run(run, qrels, ["nDCG@3", "RR@10"], drop_no_relevant=True)
    assert sorted(dropped.per_query) == ["q1", "q2", "q3"] and dropped.no_relevant == ["q5"]
    assert dropped.aggregate["nDCG@3"] == pytest.approx((ndcg_q1 + 1) / 3)
    assert dropped.aggregate["RR@10"] == pytest.approx((1 / 2 + 1) / 3)
    back = dropped.to_dict(per_query=False)
    assert (back["num_no_relevant"], back["no_relevant"], back["num_queries"]) == (1, ["q5"], 3)
    assert back["no_relevant_dropped"] is True
    # the threshold is `rel`: with rel=2, q2 (only a rel=1 judgment) has no relevant passage
    strict = evaluate_run(run, qrels, ["RR@10"], rel=2, drop_no_relevant=True)
    assert strict.no_relevant == ["q2", "q3", "q5"] and sorted(strict.per_query) == ["q1"]


def test_a_run_that_retrieved_no_judged_passage_is_warned_about(caplog):
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}}
    other_corpus = Run({"q1": {"x7": 2.0, "x8": 1.0}, "q2": {"x9": 1.0}}, name="other")
    with caplog.at_level("WARNING"):
        result = evaluate_run(other_corpus, qrels, ["nDCG@3"])
    assert result.aggregate["nDCG@3"] == 0.0
    assert "retrieved none of the judged passages of its 2 evaluated queries" in caplog.text
    assert "'x7'" in caplog.text and "'d1'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # one judged passage retrieved, at any rank: no warning
        evaluate_run(Run({"q1": {"x7": 2.0, "d1": 1.0}, "q2": {"x9": 1.0}}), qrels, ["nDCG@3"])
    assert "retrieved none" not in caplog.text
