from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from fakes import HashEncoder, hash_vector

from chatretriever.io.trec import read_run
from chatretriever.retrieval.encode import EncodeConfig, encode_corpus, list_shards
from chatretriever.retrieval.index import DenseIndex, EncoderMismatchError
from chatretriever.retrieval.search import (
    FORMULATIONS,
    Formulation,
    check_k,
    formulate,
    formulate_all,
    joins_newest_first,
    save_run,
    search_dense,
    session_text,
    settings_path,
)
from chatretriever.types import Passage, Session, Turn

SESSION = Session(
    id="q1",
    turns=(
        Turn("system", "be brief"),
        Turn("user", "tell me about jaguars"),
        Turn("assistant", "jaguars are big cats of the americas"),
        Turn("user", "what do they eat"),
    ),
    rewrite="what do jaguars eat",
    metadata={"topic": "cats"},
)

CORPUS = [
    Passage("cars", "the jaguar car company builds luxury cars"),
    Passage("diet", "jaguars eat deer capybaras and caimans", title="Jaguar diet"),
    Passage("range", "jaguars live in the rainforest of the americas"),
    Passage("pasta", "how to cook pasta"),
]


def only_text(s: Session) -> str:
    assert len(s.turns) == 1 and s.turns[0].role == "user"
    return s.turns[0].content


def test_formulations_turn_a_session_into_one_user_turn():
    assert formulate(SESSION, "session") is SESSION
    assert only_text(formulate(SESSION, "last_turn")) == "what do they eat"
    assert only_text(formulate(SESSION, Formulation.ALL_USER_TURNS)) == (
        "what do they eat\ntell me about jaguars"
    )
    assert only_text(formulate(SESSION, "full_history")) == (
        "what do they eat\njaguars are big cats of the americas\ntell me about jaguars"
    )
    rewritten = formulate(SESSION, "rewrite")
    assert only_text(rewritten) == "what do jaguars eat"
    assert (rewritten.id, rewritten.rewrite, dict(rewritten.metadata)) == (
        "q1",
        "what do jaguars eat",
        {"topic": "cats"},
    )
    assert set(FORMULATIONS) == {f.value for f in Formulation}


def test_session_text_puts_the_current_question_first():
    assert session_text(SESSION).splitlines()[0] == "what do they eat"
    assert session_text(SESSION).splitlines()[-1] == "be brief"


def test_missing_rewrite_raises_or_falls_back_with_a_warning(caplog):
    plain = Session("q2", (Turn("user", "hello there"),))
    with pytest.raises(ValueError, match="1 of 2 sessions have no rewrite"):
        formulate_all([SESSION, plain], "rewrite")
    with caplog.at_level(logging.WARNING):
        out = formulate_all([SESSION, plain], "rewrite", missing_rewrite="last_turn")
    assert [only_text(s) for s in out] == ["what do jaguars eat", "hello there"]
    assert "1 of 2 sessions have no rewrite" in caplog.text
    with pytest.raises(ValueError):
        formulate_all([plain], "rewrite", missing_rewrite="ignore")
    with pytest.raises(ValueError):
        formulate(plain, "no_such_formulation")


@pytest.fixture
def index(tmp_path):
    pytest.importorskip("faiss")
    encode_corpus(HashEncoder(), CORPUS, tmp_path / "emb", EncodeConfig(show_progress=False))
    return DenseIndex.build(list_shards([tmp_path / "emb"]))


# Each formulation's query text, written out by hand (newest turn first).
QUERY_TEXTS = {
    "last_turn": "what do they eat",
    "all_user_turns": "what do they eat\ntell me about jaguars",
    "full_history": "what do they eat\njaguars are big cats of the americas\ntell me about jaguars",
    "rewrite": "what do jaguars eat",
}


@pytest.mark.parametrize("formulation", list(QUERY_TEXTS))
def test_dense_search_encodes_the_formulated_query(index, formulation):
    enc = HashEncoder()
    run = search_dense(enc, index, [SESSION], k=4, formulation=formulation, show_progress=False)
    # expected: inner products of the hand-written query's vector with every passage's vector
    query = hash_vector(QUERY_TEXTS[formulation], enc.dim)
    passages = np.stack([hash_vector(f"{p.title} {p.text}", enc.dim) for p in CORPUS])
    scores = passages @ query / np.linalg.norm(query) / np.linalg.norm(passages, axis=1)
    expected = {p.id: float(s) for p, s in zip(CORPUS, scores, strict=True)}
    assert run.scores["q1"] == pytest.approx(expected, abs=1e-6)
    assert run.name == f"fake-hash.{formulation}"


class RecordingEncoder(HashEncoder):
    """A HashEncoder that records the sessions it encodes; `keeps_text_end` declares, as the
    LLM encoders (`EmbLLM`) do, that it keeps the end of an over-long text."""

    def __init__(self, keeps_text_end: bool) -> None:
        super().__init__()
        self.keeps_text_end, self.seen = keeps_text_end, []

    def encode_sessions(self, sessions, batch_size=16, show_progress=False):
        self.seen += list(sessions)
        return super().encode_sessions(sessions, batch_size, show_progress)


@pytest.mark.parametrize("formulation", ["all_user_turns", "full_history"])
def test_joined_turns_follow_the_encoders_cut_side(index, formulation):
    # an encoder that keeps a long text's end reads the turns oldest first, the question last
    oldest_first = "\n".join(reversed(QUERY_TEXTS[formulation].split("\n")))
    for keeps_end, text in ((False, QUERY_TEXTS[formulation]), (True, oldest_first)):
        enc = RecordingEncoder(keeps_end)
        search_dense(enc, index, [SESSION], k=2, formulation=formulation, show_progress=False)
        assert [only_text(s) for s in enc.seen] == [text]
        assert joins_newest_first(enc) is not keeps_end
        assert only_text(formulate(SESSION, formulation, newest_first=not keeps_end)) == text
    assert joins_newest_first(HashEncoder())  # no declaration: newest first, as before


class CountingIndex:
    """A DenseIndex stand-in that records the (Q, D) shape of every search call."""

    def __init__(self, index):
        self.inner, self.calls = index, []

    def check_encoder(self, *args):
        return self.inner.check_encoder(*args)

    def search(self, queries, k, params=None):
        self.calls.append(queries.shape)
        return self.inner.search(queries, k, params)


def test_dense_search_encodes_every_query_then_searches_once(index):
    sessions = [Session(f"s{i}", (Turn("user", f"jaguar {i}"),)) for i in range(5)]
    counting, enc = CountingIndex(index), HashEncoder()
    run = search_dense(enc, counting, sessions, k=2, batch_size=2, show_progress=False)
    assert counting.calls == [(5, 64)]  # one Faiss call for all five queries
    assert sorted(run.scores) == [f"s{i}" for i in range(5)] and enc.sessions_encoded == 5
    assert search_dense(enc, counting, [], k=2, show_progress=False).scores == {}


def test_rewrite_ranks_the_answer_passage_first(index):
    enc = HashEncoder()
    rew = search_dense(enc, index, [SESSION], k=4, formulation="rewrite", show_progress=False)
    assert rew.ranked("q1")[0].doc_id == "diet"
    assert rew.ranked("q1")[-1].doc_id == "pasta"
    assert rew.scores["q1"]["diet"] > rew.scores["q1"]["range"] > rew.scores["q1"]["pasta"]


def test_dense_search_batches_and_refuses_other_encoders(index):
    sessions = [Session(f"s{i}", (Turn("user", f"jaguar {i}"),)) for i in range(5)]
    run = search_dense(HashEncoder(), index, sessions, k=3, batch_size=2, show_progress=False)
    assert sorted(run.scores) == [f"s{i}" for i in range(5)]
    assert all(len(d) == 3 for d in run.scores.values())
    with pytest.raises(EncoderMismatchError):
        search_dense(HashEncoder(name="other"), index, sessions, show_progress=False)
    with pytest.raises(EncoderMismatchError):
        search_dense(HashEncoder(dim=32), index, sessions, show_progress=False)


def test_save_run_writes_trec_and_settings(index, tmp_path):
    run = search_dense(HashEncoder(), index, [SESSION], k=3, show_progress=False)
    n = save_run(tmp_path / "run.trec", run, {"k": 3, "formulation": "session"})
    assert n == 3
    back = read_run(tmp_path / "run.trec")
    assert [d.doc_id for d in back.ranked("q1")] == [d.doc_id for d in run.ranked("q1")]
    lines = (tmp_path / "run.trec").read_text().splitlines()
    assert lines[0].split()[:4] == ["q1", "Q0", run.ranked("q1")[0].doc_id, "1"]
    settings = json.loads(settings_path(tmp_path / "run.trec").read_text())
    assert settings["k"] == 3 and settings["run_name"] == "fake-hash.session"


def test_queries_must_be_sessions_with_distinct_ids_and_k_at_least_1(index):
    from chatretriever.retrieval.search import search_dense

    enc = HashEncoder()
    one = Session("s1", (Turn("user", "jaguar"),))
    with pytest.raises(ValueError, match=r"sessions\[1\]\.id 's1' is also sessions\[0\]'s"):
        search_dense(enc, index, [one, one], k=3)
    with pytest.raises(TypeError, match="sessions must be a list of Sessions, got a Session"):
        search_dense(enc, index, one, k=3)
    with pytest.raises(TypeError, match=r"sessions\[0\] must be a Session .*from_messages"):
        search_dense(enc, index, [[{"role": "user", "content": "jaguar"}]], k=3)
    for k in (0, -1, 2.0, True):  # True is an int to Python, not a count of hits
        with pytest.raises(ValueError, match="k must be an integer of at least 1"):
            search_dense(enc, index, [one], k=k)
    for check in (check_k, lambda k: index.search(enc.encode_sessions([one]), k)):
        with pytest.raises(ValueError, match="k must be an integer of at least 1, got True"):
            check(True)  # each checks k itself: BM25 uses check_k, a caller may use the index
    blank = Session("s2", (Turn("user", "jaguar"), Turn("assistant", "yes"), Turn("user", "   ")))
    for call in (
        lambda: formulate_all([blank], "session"),
        lambda: search_dense(enc, index, [blank], k=3),
    ):
        with pytest.raises(ValueError, match=r"session 's2': the current question .* is empty"):
            call()
    with pytest.raises(ValueError, match="formulation must be one of session, last_turn"):
        search_dense(enc, index, [one], k=3, formulation="lastturn")
