"""Rationale API inputs: wording names, bare strings, Passages as documents, and the student's
empty and numpy inputs; each mistake is a TypeError / ValueError naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chatretriever.methods.rationale.distill import Predictor, PredictorConfig, RabtrieverEncoder
from chatretriever.methods.rationale.prompts import BinaryChoicePrompt
from chatretriever.methods.rationale.reranker import BinaryChoiceReranker
from chatretriever.methods.rationale.student import RabtrieverStudent
from chatretriever.types import Passage, Run, Session, Turn

DOCS = ["ask a question", "give some advice"]
SESSIONS = [
    Session("a", (Turn("user", "i am sad"),)),
    Session("b", (Turn("user", "hi"), Turn("assistant", "hello"), Turn("user", "help"))),
]


@pytest.fixture(scope="module")
def reranker(tiny_llama_dir):
    return BinaryChoiceReranker.from_pretrained(tiny_llama_dir, batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def student(reranker):
    hidden = reranker.model.config.hidden_size
    encoder = RabtrieverEncoder(reranker.model, reranker.prompt, batch_size=2)
    torch.manual_seed(0)
    return RabtrieverStudent(encoder, Predictor(PredictorConfig(hidden=hidden)))


def test_an_unknown_wording_is_a_value_error_listing_the_wordings(tiny_llama_dir, tokenizer):
    with pytest.raises(ValueError, match=r"wording must be one of \['ab', 'tf'\], got 'xx'"):
        BinaryChoiceReranker.from_pretrained(tiny_llama_dir, wording="xx", device="cpu")
    with pytest.raises(ValueError, match=r"wording must be one of \['ab', 'tf'\]"):
        BinaryChoicePrompt(tokenizer, "AB")
    with pytest.raises(TypeError, match=r"wording must be one of .* got a int"):
        BinaryChoicePrompt(tokenizer, 3)
    assert BinaryChoicePrompt(tokenizer, "tf").wording.name == "tf"


def test_a_bare_document_or_session_string_is_refused(reranker):
    with pytest.raises(TypeError, match=r"documents must be a list of .*got a str: wrap one"):
        reranker.score_pairs("abc", SESSIONS[:1])  # not 3 one-letter documents
    with pytest.raises(TypeError, match=r"documents must be a list of .*got a str"):
        reranker.score_matrix("abc", SESSIONS)
    with pytest.raises(TypeError, match=r"sessions must be a list of sessions, got a str"):
        reranker.score_pairs(DOCS[:1], "i feel sad")
    with pytest.raises(TypeError, match=r"document must be one document text or Passage"):
        reranker.score_document(DOCS, SESSIONS)
    with pytest.raises(TypeError, match=r"documents\[1\] must be a Passage.*got a int"):
        reranker.score_pairs([DOCS[0], 7], SESSIONS)
    with pytest.raises(ValueError, match="1 documents for 2 sessions"):
        reranker.score_pairs(DOCS[:1], SESSIONS)


def test_passages_score_as_their_text(reranker):
    passages = [Passage(f"d{i}", t) for i, t in enumerate(DOCS)]
    want = reranker.score_pairs(DOCS, SESSIONS)
    np.testing.assert_array_equal(reranker.score_pairs(passages, SESSIONS), want)
    np.testing.assert_allclose(
        reranker.score_matrix(passages, SESSIONS), reranker.score_matrix(DOCS, SESSIONS), atol=1e-6
    )
    titled = Passage("t", "some advice", title="advice")  # its text: "title\ntext"
    np.testing.assert_array_equal(
        reranker.score_document(titled, SESSIONS),
        reranker.score_document("advice\nsome advice", SESSIONS),
    )


def test_rerank_takes_passages_and_names_a_bad_document(reranker):
    run = Run({"a": {"d0": 2.0, "d1": 1.0}, "b": {"d0": 1.0}})
    texts = {f"d{i}": t for i, t in enumerate(DOCS)}
    passages = {d: Passage(d, t) for d, t in texts.items()}
    for reuse in (True, False):
        want = reranker.rerank(run, texts, SESSIONS, reuse_kv=reuse).scores
        assert reranker.rerank(run, passages, SESSIONS, reuse_kv=reuse).scores == want
    with pytest.raises(TypeError, match=r"documents\['d1'\] must be a text, a Passage.*got a int"):
        reranker.rerank(run, {**texts, "d1": 5}, SESSIONS)
    with pytest.raises(ValueError, match=r"documents\['d0'\]: a passage mapping needs"):
        reranker.rerank(run, {**texts, "d0": {"body": "x"}}, SESSIONS)
    with pytest.raises(TypeError, match=r"documents must be a mapping of doc id"):
        reranker.rerank(run, list(passages.values()), SESSIONS)
    messages = [[{"role": "user", "content": "i am sad"}]]
    with pytest.raises(TypeError, match=r"sessions\[0\] must be a Session"):
        reranker.rerank(run, texts, messages)


def test_student_states_of_nothing_are_zero_rows_of_the_hidden_size(student):
    hidden = student.predictor.config.hidden
    assert tuple(student.document_states([]).shape) == (0, hidden)
    assert tuple(student.query_states([]).shape) == (0, hidden)
    queries = student.query_states(SESSIONS)
    scores = student.score(queries, student.document_states([]))
    assert tuple(scores.shape) == (2, 0) and scores.dtype == torch.float32
    assert tuple(student.score(student.query_states([]), queries).shape) == (0, 2)


def test_student_scores_numpy_states_and_names_a_bad_argument(student):
    queries, docs = student.query_states(SESSIONS), student.document_states(DOCS)
    want = student.score(queries, docs)
    torch.testing.assert_close(student.score(queries.numpy(), docs.numpy()), want)
    torch.testing.assert_close(student.score(queries.numpy().astype(np.float64), docs), want)
    passages = [Passage(f"d{i}", t) for i, t in enumerate(DOCS)]
    torch.testing.assert_close(student.document_states(passages), docs)
    with pytest.raises(ValueError, match=r"doc_states must be \(rows, 32\) float states.*\(32,\)"):
        student.score(queries, docs[0])
    with pytest.raises(ValueError, match=r"query_states must be \(rows, 32\)"):
        student.score(queries[:, :8], docs)
    with pytest.raises(TypeError, match=r"doc_states must be a \(rows, 32\) tensor or array"):
        student.score(queries, "abc")
    with pytest.raises(TypeError, match=r"documents must be a list of .*got a str"):
        student.document_states("abc")
