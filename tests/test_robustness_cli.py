"""`chatretriever robustness` end to end with the fake encoder and a fake LLM."""

from __future__ import annotations

import json

import pytest
from fakes import HashEncoder
from test_robustness import PASSAGES, QRELS, ChoosingLLM, conversation_sessions

from chatretriever.apps.registry import register_encoder, unregister_encoder
from chatretriever.cli import main
from chatretriever.io.sessions import read_sessions, write_sessions

pytest.importorskip("faiss")
pytest.importorskip("ir_measures")
pytest.importorskip("bm25s")


@pytest.fixture
def files(tmp_path, monkeypatch):
    register_encoder("fake", lambda rest: HashEncoder(name=rest or "fake-hash"))
    loads: list[str] = []
    fake = ChoosingLLM("unreasonable")

    def fake_generator(name, *settings):
        loads.append(name)
        return fake

    from chatretriever.retrieval.robustness import hf_generator

    monkeypatch.setattr(hf_generator, "hf_batch_generator", fake_generator)
    corpus = "".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in PASSAGES.items())
    (tmp_path / "corpus.jsonl").write_text(corpus)
    write_sessions(tmp_path / "sessions.jsonl", conversation_sessions())
    qrels = "".join(f"{q.query_id} 0 {q.doc_id} {q.relevance}\n" for q in QRELS)
    (tmp_path / "qrels.txt").write_text(qrels)
    yield tmp_path, loads, fake
    unregister_encoder("fake")


def test_robustness_command_dense_hybrid_and_cached_rerun(files, capsys) -> None:
    d, loads, fake = files
    corpus = str(d / "corpus.jsonl")
    assert main(["index", corpus, "--out", str(d / "idx"), "--model", "fake:", "--bm25"]) == 0
    argv = [
        "robustness", "--sessions", str(d / "sessions.jsonl"), "--qrels", str(d / "qrels.txt"),
        "--index", str(d / "idx"), "--out", str(d / "rob"), "--contexts", "2",
        "--hybrid", "rrf",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fake:.session+bm25.last_turn.rrf: original nDCG@3" in out and "SD" in out
    report = json.loads((d / "rob" / "robustness.json").read_text())
    row = report["systems"]["fake:.session+bm25.last_turn.rrf"]
    assert set(row) == {"original", "partial", "full", "seconds"}
    assert report["llm"]["model"] == "smollm2-135m-instruct" and report["llm"]["generated"] > 0
    assert len(read_sessions(d / "rob" / "full.seed1.jsonl")) == 3
    forms = {s.metadata["query_form"] for s in read_sessions(next((d / "rob").glob("partial.*")))}
    assert forms == {"original", "human_rewrite", "llm_rewrite"}
    calls = len(fake.calls)
    assert main(argv) == 0  # everything cached: no LLM call, the model is not even loaded
    assert len(fake.calls) == calls and loads == ["smollm2-135m-instruct"]
    again = json.loads((d / "rob" / "robustness.json").read_text())
    assert again["llm"]["generated"] == 0 and again["llm"]["cached"] > 0
    assert again["systems"]["fake:.session+bm25.last_turn.rrf"]["full"] == row["full"]


def test_robustness_command_bm25_rewrite_and_bad_input(files, capsys) -> None:
    d, _, fake = files
    base = ["robustness", "--sessions", str(d / "sessions.jsonl"), "--qrels", str(d / "qrels.txt")]
    argv = [*base, "--bm25", str(d / "corpus.jsonl"), "--out", str(d / "rob"), "--modes", "full"]
    assert main([*argv, "--llm-rewrite", "--contexts", "1"]) == 0
    report = json.loads((d / "rob" / "robustness.json").read_text())
    assert list(report["systems"]) == ["bm25.rewrite+llm_rewrite"]
    assert "partial" not in report["systems"]["bm25.rewrite+llm_rewrite"]
    assert any("Rewrite the user's last question" in u for u, _ in fake.calls)
    capsys.readouterr()
    assert main([*base, "--out", str(d / "x")]) == 2  # neither --bm25 nor --index
    assert "give either --bm25 CORPUS or --index DIR" in capsys.readouterr().err
    assert main([*argv, "--contexts", "0"]) == 2
