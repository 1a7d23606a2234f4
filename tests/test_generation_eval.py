"""Generation metrics (SQuAD F1, ROUGE-L, hit/miss consistency) and the answers JSONL format."""

from __future__ import annotations

import sys

import pytest

from chatretriever.errors import DataFormatError, MissingExtraError
from chatretriever.io.answers import AnswerRow, iter_answer_rows, read_answers, write_answers
from chatretriever.retrieval import generation_eval as ge
from chatretriever.retrieval.generation_eval import (
    consistency,
    normalize_answer,
    rouge_l,
    score_answers,
    summarize,
    token_f1,
)


def test_normalize_answer_is_squad_normalisation():
    assert normalize_answer("The  Cat, sat on A mat!") == "cat sat on mat"
    assert normalize_answer("an apple. Then...") == "apple then"  # "Then" is not an article
    assert normalize_answer("  ") == ""


def test_token_f1_by_hand():
    # "the cat sat" -> [cat, sat]; "a cat sat down" -> [cat, sat, down]; common = 2
    # precision = 2/2 = 1, recall = 2/3, F1 = 2 * 1 * 2/3 / (1 + 2/3) = (4/3) / (5/3) = 0.8
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # multiset overlap: [paris, paris] vs [paris]: common = 1, P = 1/2, R = 1, F1 = 2/3
    assert token_f1("Paris paris", "Paris") == pytest.approx(2 / 3)
    # a repeated token counts as often as both sides hold it: [paris, paris] vs [paris, paris,
    # london]: common = 2 (a set would say 1), P = 2/2, R = 2/3, F1 = 0.8 (a set gives 0.4)
    assert token_f1("paris paris", "paris paris london") == pytest.approx(0.8)
    assert token_f1("the", "a") == 1.0  # both empty after normalisation
    assert token_f1("", "paris") == 0.0
    assert token_f1("paris", "an") == 0.0
    assert token_f1("london", "paris") == 0.0


def test_rouge_l_by_hand():
    # tokens: [the, cat, sat] vs [the, cat, is, on, the, mat]; LCS = "the cat" = 2
    # P = 2/3, R = 2/6 = 1/3, F = 2 * (2/3) * (1/3) / (2/3 + 1/3) = 4/9
    assert rouge_l("the cat sat", "the cat is on the mat") == pytest.approx(4 / 9)
    # stemming: "cats running" vs "cat run": LCS = 2 of 2 -> 1.0
    assert rouge_l("Cats running", "cat run") == pytest.approx(1.0)
    assert rouge_l("", "cat") == 0.0


def test_rouge_l_without_rouge_score_names_the_extra(monkeypatch):
    ge._rouge_l_scorer.cache_clear()
    monkeypatch.setitem(sys.modules, "rouge_score", None)  # `import rouge_score` now fails
    with pytest.raises(MissingExtraError) as err:
        rouge_l("a", "b")
    ge._rouge_l_scorer.cache_clear()
    assert (err.value.module, err.value.extra) == ("rouge_score", "rag")
    assert str(err.value).endswith("pip install 'chatretriever[rag]'")


def test_score_answers_takes_the_best_reference_and_needs_every_answer(caplog):
    answers = {"q1": "the cat sat", "q2": "paris", "extra": "unscored"}
    refs = {"q1": ["a dog", "a cat sat down"], "q2": "Paris."}
    scores = score_answers(answers, refs)
    assert list(scores) == ["q1", "q2"]
    assert scores["q1"]["f1"] == pytest.approx(0.8)  # the second reference (see above)
    # rouge tokens [the, cat, sat] vs [a, cat, sat, down]: LCS 2, P 2/3, R 2/4 -> F = 4/7
    assert scores["q1"]["rouge_l"] == pytest.approx(4 / 7)
    assert scores["q2"] == {"f1": 1.0, "rouge_l": 1.0}
    missing = {f"m{i}": "x" for i in range(7)}
    with pytest.raises(ValueError, match=r"no answer for 7 referenced turns: 'm0', .*\(7 in all\)"):
        score_answers(answers, {**refs, **missing})
    with pytest.raises(ValueError, match="turn 'q1': .*at least one reference"):
        score_answers(answers, {"q1": []})


def test_summarize_means():
    scores = {"a": {"f1": 1.0, "rouge_l": 0.5}, "b": {"f1": 0.0, "rouge_l": 0.25}}
    assert summarize(scores) == {"n": 2, "f1": 0.5, "rouge_l": 0.375}
    assert summarize({}) == {"n": 0, "f1": None, "rouge_l": None}


def test_consistency_splits_hits_and_misses():
    scores = {
        "t1": {"f1": 0.8, "rouge_l": 0.6},
        "t2": {"f1": 0.2, "rouge_l": 0.1},
        "t3": {"f1": 0.6, "rouge_l": 0.4},
    }
    run = {
        # relevant doc "r" at rank 2: a hit for k=2 and k=3, a miss for k=1
        "t1": {"x": 3.0, "r": 2.0, "y": 1.0},
        # relevant "r" tied with "a" at rank 2..3 for k=2: (-score, docid) puts "a" first
        "t2": {"z": 5.0, "r": 1.0, "a": 1.0},
        # t3 has judgments but only rel=0 for its retrieved doc: always a miss
        "t3": {"n": 9.0},
    }
    qrels = {"t1": {"r": 1}, "t2": {"r": 2}, "t3": {"n": 0, "r": 1}}
    c = consistency(scores, run, qrels, k=2)
    assert c["k"] == 2
    assert c["hit"] == {"n": 1, "f1": 0.8, "rouge_l": 0.6}
    assert c["miss"]["n"] == 2
    assert c["miss"]["f1"] == pytest.approx(0.4)  # (0.2 + 0.6) / 2
    assert c["miss"]["rouge_l"] == pytest.approx(0.25)  # (0.1 + 0.4) / 2
    assert c["gap_f1"] == pytest.approx(0.4)  # 0.8 - 0.4
    c3 = consistency(scores, run, qrels, k=3)
    assert (c3["hit"]["n"], c3["miss"]["n"]) == (2, 1)
    assert c3["hit"]["f1"] == pytest.approx(0.5)  # (0.8 + 0.2) / 2
    assert c3["gap_f1"] == pytest.approx(-0.1)  # 0.5 - 0.6
    c1 = consistency(scores, run, qrels, k=1)
    assert c1["hit"] == {"n": 0, "f1": None, "rouge_l": None}
    assert c1["gap_f1"] is None
    with pytest.raises(ValueError, match="k must be >= 1"):
        consistency(scores, run, qrels, k=0)


def test_answers_round_trip(tmp_path):
    path = tmp_path / "answers.jsonl.gz"
    rows = [
        {"qid": "q1", "answer": "Paris is the capital.", "passages": ["d1", "d2"]},
        AnswerRow("q2", "I do not know.", ()),
        {"qid": "q3", "answer": "ünïcode"},  # passages optional
    ]
    assert write_answers(path, rows) == 3
    assert read_answers(path) == {
        "q1": "Paris is the capital.",
        "q2": "I do not know.",
        "q3": "ünïcode",
    }
    assert [r.passages for r in iter_answer_rows(path)] == [("d1", "d2"), (), ()]


def test_answers_bad_lines_name_file_line_and_field(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"qid": "q1", "answer": "a"}\n\n{"qid": "q2"}\n')
    with pytest.raises(DataFormatError) as err:
        read_answers(path)
    assert str(err.value) == f"{path}:3: field 'answer': missing field"
    path.write_text('{"qid": "q1", "answer": "a"}\n{"qid": "q1", "answer": "b"}\n')
    with pytest.raises(DataFormatError, match=r":2: field 'qid': duplicate qid 'q1'"):
        read_answers(path)
    path.write_text('{"qid": "q1", "answer": "a", "passages": ["d1", null]}\n')
    with pytest.raises(DataFormatError, match=r":1: field 'passages\[1\]'"):
        read_answers(path)
    path.write_text('{"qid": "q1", "answer": "a"\n')
    with pytest.raises(DataFormatError, match=r"answers.jsonl:1: malformed JSON"):
        read_answers(path)


def test_write_answers_is_atomic_on_a_bad_row(tmp_path):
    path = tmp_path / "answers.jsonl"
    write_answers(path, [{"qid": "old", "answer": "kept"}])
    bad_row = "<rows>:2: field 'answer': expected str, got NoneType"
    with pytest.raises(DataFormatError, match=bad_row):
        write_answers(path, [{"qid": "q1", "answer": "a"}, {"qid": "q2", "answer": None}])
    with pytest.raises(ValueError, match="duplicate qid 'q1'"):
        write_answers(path, [{"qid": "q1", "answer": "a"}, {"qid": "q1", "answer": "b"}])
    assert read_answers(path) == {"old": "kept"}
