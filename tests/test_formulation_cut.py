"""The formulations that join turns into one text ("all_user_turns", "full_history") keep the
question under every reader's cut of an over-long text: an LLM encoder's template keeps the END
of an over-long turn, a sentence embedder (and BM25's query) the START."""

from __future__ import annotations

import pytest

from chatretriever.retrieval.encode import EncodeConfig, encode_corpus, list_shards
from chatretriever.retrieval.search import search_dense
from chatretriever.types import Passage, Session, Turn

torch = pytest.importorskip("torch")
pytest.importorskip("faiss")

from chatretriever.config import LoraSettings, RetrieverConfig  # noqa: E402
from chatretriever.methods.chatretriever.model import ChatRetriever  # noqa: E402
from chatretriever.methods.uniconv.model import UniConv  # noqa: E402
from chatretriever.retrieval.baselines import BM25Retriever, TextEmbedder  # noqa: E402
from chatretriever.retrieval.index import DenseIndex  # noqa: E402

CORPUS = [
    Passage("paris", "paris is the capital of france."),
    Passage("reset", "open settings and choose reset."),
    Passage("fox", "the quick brown fox jumps over the lazy dog"),
]
QUESTION = "CURRENTQ which one is cheaper?"
# Six exchanges and the question: every joined formulation is far over 64 tokens.
LONG = Session(
    "long",
    (
        *(
            t
            for i in range(6)
            for t in (
                Turn("user", f"turn {i}: what is the capital of france?"),
                Turn("assistant", f"answer {i}: paris is the capital of france."),
            )
        ),
        Turn("user", QUESTION),
    ),
)
SHORT = Session(
    "short",
    (
        Turn("system", "be brief"),
        Turn("user", "tell me about jaguars"),
        Turn("assistant", "jaguars are big cats of the americas"),
        Turn("user", "what do they eat"),
    ),
)
# The short session's joined query texts, written out by hand.
NEWEST_FIRST = {
    "all_user_turns": "what do they eat\ntell me about jaguars",
    "full_history": "what do they eat\njaguars are big cats of the americas\ntell me about jaguars",
}
OLDEST_FIRST = {
    "all_user_turns": "tell me about jaguars\nwhat do they eat",
    "full_history": "tell me about jaguars\njaguars are big cats of the americas\nwhat do they eat",
}
JOINED = list(NEWEST_FIRST)


@pytest.fixture(scope="module")
def retriever(tiny_llama_dir) -> ChatRetriever:
    config = RetrieverConfig(dtype="fp32", max_session_len=64, max_passage_len=32)
    return ChatRetriever.from_pretrained(
        tiny_llama_dir, config=config, lora=LoraSettings(enabled=False), device="cpu"
    )


@pytest.fixture(scope="module")
def text_embedder() -> TextEmbedder:
    from conftest import build_tiny_bert

    model, tokenizer = build_tiny_bert(
        "tell me about jaguars what do they eat are big cats of the americas".split()
    )
    return TextEmbedder(model, tokenizer, name="tiny-bert", max_length=8, bf16=False)


def searched_queries(encoder, session, formulation, tmp_path, monkeypatch) -> list[Session]:
    """The query sessions a real `search_dense` over CORPUS hands to `encoder`."""
    encode_corpus(encoder, CORPUS, tmp_path / "emb", EncodeConfig(show_progress=False))
    index = DenseIndex.build(list_shards([tmp_path / "emb"]))
    seen: list[Session] = []
    real = encoder.encode_sessions

    def recording(sessions, *args, **kwargs):
        seen.extend(sessions)
        return real(sessions, *args, **kwargs)

    monkeypatch.setattr(encoder, "encode_sessions", recording)
    run = search_dense(encoder, index, [session], k=2, formulation=formulation, show_progress=False)
    assert len(run.scores[session.id]) == 2
    return seen


def only_text(s: Session) -> str:
    assert len(s.turns) == 1 and s.turns[0].role == "user"
    return s.turns[0].content


@pytest.mark.parametrize("formulation", JOINED)
def test_llm_encoder_keeps_the_question_and_newest_turns_of_a_long_join(
    retriever, formulation, tmp_path, monkeypatch
):
    (query,) = searched_queries(retriever, LONG, formulation, tmp_path, monkeypatch)
    ids = retriever.template.session_ids(query)
    text = retriever.tokenizer.decode(ids)
    assert len(ids) == 64  # over-long: the template cut it
    assert f"{QUESTION}<|im_end|>\n[EMB_1][EMB_2][EMB_3]" in text
    assert "turn 5: what is the capital of france?" in text  # the newest earlier user turn
    assert "turn 0:" not in text  # the oldest is what the cut drops


@pytest.mark.parametrize("formulation", JOINED)
def test_llm_encoder_reads_a_short_join_oldest_first(retriever, formulation, tmp_path, monkeypatch):
    (query,) = searched_queries(retriever, SHORT, formulation, tmp_path, monkeypatch)
    assert only_text(query) == OLDEST_FIRST[formulation]
    text = retriever.tokenizer.decode(retriever.template.session_ids(query))
    assert f"{OLDEST_FIRST[formulation]}<|im_end|>" in text  # fits: nothing cut


def test_every_llm_encoder_declares_that_it_keeps_a_texts_end():
    assert ChatRetriever.keeps_text_end and UniConv.keeps_text_end
    assert not hasattr(TextEmbedder, "keeps_text_end")


@pytest.mark.parametrize("formulation", JOINED)
def test_text_embedder_and_bm25_read_the_join_newest_first_as_before(
    text_embedder, formulation, tmp_path, monkeypatch
):
    (query,) = searched_queries(text_embedder, SHORT, formulation, tmp_path, monkeypatch)
    assert only_text(query) == NEWEST_FIRST[formulation]
    pytest.importorskip("bm25s")
    bm25 = BM25Retriever(CORPUS)
    texts: list[str] = []
    real = bm25.search_texts
    monkeypatch.setattr(bm25, "search_texts", lambda t, k: texts.extend(t) or real(t, k))
    bm25.search([SHORT], k=2, formulation=formulation)
    assert texts == [NEWEST_FIRST[formulation]]
