"""The shipped demo data and `chatretriever demo` with the fake encoder."""

from __future__ import annotations

import json
import re

import pytest
from fakes import HashEncoder

from chatretriever.apps.demo import MEASURES, demo_dir, load_demo_data, run_demo
from chatretriever.apps.registry import register_encoder, unregister_encoder
from chatretriever.cli import main
from chatretriever.io.trec import read_run
from chatretriever.types import qrels_to_dict

SESSION_ID = re.compile(r"^c(\d\d)::([1-9])$")


@pytest.fixture(scope="module")
def data():
    return load_demo_data()


def test_demo_files_are_package_data(data):
    assert {p.name for p in demo_dir().iterdir()} >= {
        "corpus.jsonl",
        "conversations.jsonl",
        "qrels.tsv",
        "README.md",
    }
    assert data.corpus_path.parent == demo_dir()


def test_demo_corpus_has_topics_with_distractors(data):
    assert 250 <= len(data.passages) <= 300
    for p in data.passages:
        assert p.title and 60 <= len(p.text.split()) <= 120, p.id
    topics: dict[str, int] = {}
    for p in data.passages:
        topics[p.metadata["topic"]] = topics.get(p.metadata["topic"], 0) + 1
    assert len(topics) == 12 and min(topics.values()) >= 15


def test_demo_conversations_grow_turn_by_turn(data):
    by_conversation: dict[str, list] = {}
    for s in data.sessions:
        m = SESSION_ID.match(s.id)
        assert m, s.id
        by_conversation.setdefault(m.group(1), []).append(s)
        assert int(m.group(2)) == sum(1 for t in s.turns if t.role == "user")
    assert len(by_conversation) == 12
    for sessions in by_conversation.values():
        assert 3 <= len(sessions) <= 5
        for before, after in zip(sessions, sessions[1:], strict=False):
            # the next session is this one, its answer, and one new question
            assert after.turns[: len(before.turns)] == before.turns
            assert after.turns[len(before.turns)].role == "assistant"
            assert after.turns[len(before.turns)].content == before.response
            assert len(after.turns) == len(before.turns) + 2
        # most later questions need the conversation: their standalone rewrite differs
        dependent = [s for s in sessions[1:] if s.rewrite != s.question]
        assert len(dependent) >= len(sessions) - 2 and all(s.rewrite for s in sessions)


def test_every_demo_turn_is_judged(data):
    judged = qrels_to_dict(data.qrels)
    assert set(judged) == {s.id for s in data.sessions}
    assert all(max(docs.values()) == 2 for docs in judged.values())
    assert {q.relevance for q in data.qrels} <= {1, 2}


@pytest.fixture
def fake_model():
    made: list[HashEncoder] = []

    def factory(rest: str) -> HashEncoder:
        made.append(HashEncoder(dim=128, name=rest or "fake-hash"))
        return made[-1]

    register_encoder("fake", factory)
    yield made
    unregister_encoder("fake")


def test_demo_command(tmp_path, fake_model, capsys, data):
    out = tmp_path / "demo"
    argv = ["demo", "--model", "fake:", "--out", str(out), "--baseline", "fake:other"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("demo: 266 passages, 55 turns of 12 conversations; model fake:")
    for s in data.sessions:
        assert f"{s.id}  {s.question}" in text
    assert text.count("  fake: (session):") == 55 and text.count("  BM25 (last turn):") == 55
    lines = text.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("system ")) :]
    assert table[0].split() == ["system", "nDCG@3", "MRR@10", "R@10"]
    assert table[1].startswith("fake: (session)") and table[2].startswith("BM25 (last turn)")
    assert table[3].startswith("fake:other (all user turns)")
    assert table[4].startswith("hybrid: fake: + BM25 (linear)")
    assert "(55 judged turns)" in table[5]

    results = json.loads((out / "results.json").read_text())
    assert results["measures"] == list(MEASURES) and results["model"] == "fake:"
    assert results["fusion"]["method"] == "linear" and results["fusion"]["weight"] == 0.5
    systems = results["systems"]
    assert list(systems) == [
        "fake: (session)",
        "BM25 (last turn)",
        "fake:other (all user turns)",
        "hybrid: fake: + BM25 (linear)",
    ]
    for system in systems.values():
        assert system["num_queries"] == 55 and set(system["aggregate"]) == set(MEASURES)
        assert all(0.0 <= v <= 1.0 for v in system["aggregate"].values())
    # the printed table holds the saved numbers
    bm25 = systems["BM25 (last turn)"]["aggregate"]
    assert table[2].split()[-3:] == [f"{bm25[m]:.3f}" for m in MEASURES]
    # the per-turn top 3 are the heads of the saved runs
    runs = {k: read_run(out / f"{k}.trec") for k in ("model", "bm25", "baseline", "hybrid")}
    assert runs["bm25"].name == "bm25.last_turn" and runs["model"].name == "fake-hash.session"
    assert runs["baseline"].name == "other.all_user_turns"
    for turn in results["turns"]:
        for key in ("model", "bm25"):
            ranked = runs[key].ranked(turn["id"])
            assert [h["id"] for h in turn[key]] == [d.doc_id for d in ranked[:3]]
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the demo index is a corpus index that `chat` can use; the baseline has its own
    assert (out / "index-fake" / "index" / "meta.json").exists()
    assert (out / "index-fake_other" / "index" / "meta.json").exists()
    # the baseline searched every user turn, not the session: it equals a search by hand
    baseline = fake_model[1]
    assert baseline.name == "other" and baseline.passages_encoded == 266


def test_demo_hybrid_is_the_fusion_of_the_model_and_bm25_runs(tmp_path, data):
    from chatretriever.retrieval.baselines import BM25Retriever
    from chatretriever.retrieval.corpus_index import build_corpus_index
    from chatretriever.retrieval.fusion import FusionConfig, min_max
    from chatretriever.retrieval.search import Formulation, search_dense

    fusion = FusionConfig("linear", weight=0.7)
    result = run_demo(
        HashEncoder(name="m"), "m", tmp_path, data, show_progress=False, fusion=fusion
    )
    labels = list(result.evaluations)
    assert labels == ["m (session)", "BM25 (last turn)", "hybrid: m + BM25 (linear)"]
    assert result.evaluations[labels[2]].num_queries == 55
    hybrid = read_run(tmp_path / "hybrid.trec")
    # by hand: each side's top 100 min-max normalised, 0.7 dense + 0.3 BM25
    built = build_corpus_index(HashEncoder(name="m"), "m", data.corpus_path, tmp_path / "again")
    dense = search_dense(HashEncoder(name="m"), built.index, data.sessions, k=100)
    bm25 = BM25Retriever(data.passages).search(
        data.sessions, k=100, formulation=Formulation.LAST_TURN
    )
    for s in data.sessions:
        d = min_max({h.doc_id: h.score for h in dense.ranked(s.id)})
        b = min_max({h.doc_id: h.score for h in bm25.ranked(s.id)})
        fused = {doc: 0.7 * d.get(doc, 0.0) + 0.3 * b.get(doc, 0.0) for doc in d.keys() | b.keys()}
        expected = sorted(fused, key=lambda doc: (-fused[doc], doc))[:10]
        assert [h.doc_id for h in hybrid.ranked(s.id)] == expected, s.id


def test_demo_reads_whole_sessions_and_reuses_its_index(tmp_path, data):
    class Recording(HashEncoder):
        def encode_sessions(self, sessions, batch_size=16, show_progress=False):
            self.roles = getattr(self, "roles", []) + [[t.role for t in s.turns] for s in sessions]
            return super().encode_sessions(sessions, batch_size, show_progress)

    first = Recording(name="rec")
    result = run_demo(first, "rec", tmp_path, data, show_progress=False)
    assert first.passages_encoded == 266
    assert sorted(map(len, first.roles)) == sorted(len(s.turns) for s in data.sessions)
    assert any("assistant" in roles for roles in first.roles)  # the full session, answers too
    assert [t.session.id for t in result.turns] == [s.id for s in data.sessions]
    assert all(len(t.model_hits) == 3 == len(t.bm25_hits) for t in result.turns)
    assert result.turns[0].model_hits[0].title  # titles come with the hits

    again = Recording(name="rec")
    run_demo(again, "rec", tmp_path, data, show_progress=False)
    assert again.passages_encoded == 0  # embeddings kept from the first run


def test_demo_without_the_model_fails_in_one_line(tmp_path, capsys):
    code = main(["demo", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "no-such-model" in err and "\n" not in err


def test_demo_baseline_the_user_names_must_load(tmp_path, fake_model, capsys):
    missing = str(tmp_path / "no-such-baseline")
    code = main(["demo", "--model", "fake:", "--baseline", missing, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "no-such-baseline" in err


def test_demo_fixes_the_model_precision_and_keeps_one_index_per_precision(
    tmp_path, data, tiny_llama_dir
):
    from chatretriever.config import LoraSettings, RetrieverConfig
    from chatretriever.methods.chatretriever.model import ChatRetriever

    config = RetrieverConfig(dtype="auto", max_session_len=96, max_passage_len=64)
    model = ChatRetriever.from_pretrained(
        tiny_llama_dir, config=config, lora=LoraSettings(enabled=False), device="cpu"
    )
    from chatretriever.apps.registry import precision_of

    for dtype in ("fp32", "bf16"):
        result = run_demo(model, "tiny", tmp_path, data, show_progress=False, dtype=dtype)
        assert model.config.dtype == dtype and result.dtype == dtype
        assert precision_of(model) == dtype
        assert result.index_dir == tmp_path / f"index-tiny-{dtype}"
        assert json.loads((tmp_path / "results.json").read_text())["dtype"] == dtype
    assert (tmp_path / "index-tiny-fp32" / "index" / "meta.json").exists()
    # a model without a precision switch is left alone and its index keeps the plain name
    result = run_demo(HashEncoder(), "fake:", tmp_path, data, show_progress=False, dtype="bf16")
    assert result.dtype is None and result.index_dir == tmp_path / "index-fake"
