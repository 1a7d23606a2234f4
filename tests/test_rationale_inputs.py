"""Hidden-rationale inputs: bad adapter and predictor files, k, message lists, budgets; the
Python API's inputs (wording names, bare strings, Passages, the student's empty and numpy
inputs), each mistake a TypeError / ValueError naming the argument."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from chatretriever.errors import DataFormatError
from chatretriever.methods.rationale.distill import (
    Predictor,
    PredictorConfig,
    RabtrieverEncoder,
    load_predictor,
    save_predictor,
)
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


def _adapter(tmp_path: Path, model, name: str) -> Path:
    import peft

    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    wrapped.save_pretrained(tmp_path / name)
    return tmp_path / name


def test_bad_adapter_files_are_one_line_errors(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM, LlamaConfig

    good = _adapter(tmp_path, AutoModelForCausalLM.from_pretrained(tiny_llama_dir), "good")
    weights = good / "adapter_model.safetensors"
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "adapter_config.json").write_text(
        (good / "adapter_config.json").read_text()
    )
    with pytest.raises(DataFormatError, match=r"noweights/adapter_model.safetensors: not found"):
        BinaryChoiceReranker.from_pretrained(tiny_llama_dir, adapter=tmp_path / "noweights")
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / "adapter_config.json").write_text(
        (good / "adapter_config.json").read_text()
    )
    (tmp_path / "trunc" / "adapter_model.safetensors").write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DataFormatError, match=r"trunc/adapter_model.safetensors: truncated or not"):
        BinaryChoiceReranker.from_pretrained(tiny_llama_dir, adapter=tmp_path / "trunc")
    # an adapter of a wider model (hidden 48) on this one (hidden 32): which sizes differ
    sizes = {"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 2}
    config = LlamaConfig(vocab_size=400, num_attention_heads=4, num_key_value_heads=2, **sizes)
    wide = _adapter(tmp_path, AutoModelForCausalLM.from_config(config), "wide")
    with pytest.raises(ValueError, match=r"wide does not fit the backbone .*other sizes") as e:
        BinaryChoiceReranker.from_pretrained(tiny_llama_dir, adapter=wide, device="cpu")
    assert "48" in str(e.value) and "32" in str(e.value) and "\n" not in str(e.value)
    # the good one loads
    tuned = BinaryChoiceReranker.from_pretrained(tiny_llama_dir, adapter=good, device="cpu")
    assert np.isfinite(tuned.score_pairs(DOCS, SESSIONS)).all()


def test_bad_predictor_files_are_one_line_errors(tmp_path):
    out = save_predictor(Predictor(PredictorConfig(hidden=4)), tmp_path / "p")
    assert load_predictor(out).config.hidden == 4
    config = json.loads((out / "predictor.json").read_text())
    (out / "predictor.json").write_text(json.dumps({**config, "bogus": 1}))
    with pytest.raises(DataFormatError, match=r"predictor.json: unknown field 'bogus'"):
        load_predictor(out)
    (out / "predictor.json").write_text("{not json")
    with pytest.raises(DataFormatError, match=r"predictor.json: not valid JSON"):
        load_predictor(out)
    (out / "predictor.json").write_text(json.dumps({**config, "hidden": 8}))
    with pytest.raises(DataFormatError, match=r"predictor.safetensors: does not match predictor"):
        load_predictor(out)
    (out / "predictor.json").write_text(json.dumps(config))
    weights = out / "predictor.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(DataFormatError, match=r"predictor.safetensors: truncated or not a"):
        load_predictor(out)
    weights.unlink()
    with pytest.raises(DataFormatError, match=r"predictor.safetensors: not found"):
        load_predictor(out)


def test_rerank_refuses_k_below_one(reranker):
    run = Run({"a": {"d1": 2.0, "d2": 1.0}})
    docs = {"d1": DOCS[0], "d2": DOCS[1]}
    assert len(reranker.rerank(run, docs, SESSIONS, k=1).ranked("a")) == 1
    for k in (0, -1, 1.5):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            reranker.rerank(run, docs, SESSIONS, k=k)


def test_message_lists_score_as_sessions(reranker):
    messages = [[{"role": t.role, "content": t.content} for t in s.turns] for s in SESSIONS]
    want = reranker.score_pairs(DOCS, SESSIONS)
    np.testing.assert_array_equal(reranker.score_pairs(DOCS, messages), want)
    np.testing.assert_array_equal(
        reranker.score_document(DOCS[0], messages), reranker.score_document(DOCS[0], SESSIONS)
    )
    np.testing.assert_allclose(
        reranker.score_matrix(DOCS, messages), reranker.score_matrix(DOCS, SESSIONS), atol=1e-6
    )
    with pytest.raises(TypeError, match=r"sessions\[0\] is one message"):
        reranker.score_pairs(DOCS[:1], [{"role": "user", "content": "hi"}])


def test_student_encoder_reads_message_lists(reranker):
    from chatretriever.methods.rationale.distill import RabtrieverEncoder

    encoder = RabtrieverEncoder(reranker.model, reranker.prompt, batch_size=2)
    messages = [[{"role": t.role, "content": t.content} for t in s.turns] for s in SESSIONS]
    torch.testing.assert_close(encoder.query_states(messages), encoder.query_states(SESSIONS))


def test_student_encoder_states_of_nothing_are_zero_rows_of_the_hidden_size(reranker):
    from chatretriever.methods.rationale.distill import RabtrieverEncoder

    encoder = RabtrieverEncoder(reranker.model, reranker.prompt, batch_size=2)
    hidden = reranker.model.config.hidden_size
    assert tuple(encoder.document_states([]).shape) == (0, hidden)
    assert tuple(encoder.query_states([]).shape) == (0, hidden)
    assert tuple(encoder.teacher_states([], []).shape) == (0, hidden)
    assert tuple(encoder.document_states([*DOCS, DOCS[0]]).shape) == (len(DOCS) + 1, hidden)


def test_scoring_warns_when_budgets_differ_from_the_adapters(tmp_path, tiny_llama_dir, caplog):
    import yaml
    from transformers import AutoModelForCausalLM

    adapter = _adapter(tmp_path, AutoModelForCausalLM.from_pretrained(tiny_llama_dir), "a")
    recipe = {"model": str(tiny_llama_dir), "wording": "ab", "max_document_tokens": 64,
              "max_query_tokens": 256}  # fmt: skip
    (adapter / "train_config.yaml").write_text(yaml.safe_dump(recipe))
    with caplog.at_level(logging.WARNING, "chatretriever.methods.rationale.reranker"):
        BinaryChoiceReranker.from_pretrained(tiny_llama_dir, adapter=adapter, device="cpu",
                                             max_document_tokens=256)  # fmt: skip
    warned = [r.getMessage() for r in caplog.records if "prompt budgets" in r.getMessage()]
    assert len(warned) == 1 and "max_document_tokens 64 (tuned) vs 256" in warned[0]
    assert "max_query_tokens" not in warned[0]
    caplog.clear()
    BinaryChoiceReranker.from_pretrained(tiny_llama_dir, adapter=adapter, device="cpu",
                                         max_document_tokens=64, max_query_tokens=256)  # fmt: skip
    assert not [r for r in caplog.records if "prompt budgets" in r.getMessage()]


def test_benchmark_takes_builtin_reranker_and_student_names(tmp_path):
    import argparse

    path = Path(__file__).parents[1] / "benchmarks" / "rationale.py"
    spec = importlib.util.spec_from_file_location("rationale_benchmark_names", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.named_dir("sft=rahore-smol", "rahore") == ("sft", "rahore-smol")
    assert bench.named_dir("st=rabtriever-smol", "rabtriever") == ("st", "rabtriever-smol")
    assert bench.named_dir(f"d={tmp_path}") == ("d", str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match=r"not a directory or a built-in name"):
        bench.named_dir("st=rahore-smol", "rabtriever")  # a reranker is not a student
    with pytest.raises(argparse.ArgumentTypeError, match=r"is not a directory$"):
        bench.named_dir("bi=rahore-smol")  # --dense: directories only


def test_kv_reuse_caches_only_documents_several_queries_retrieved(reranker, monkeypatch):
    from chatretriever.methods.rationale import reranker as module

    cached: list[int] = []
    real = module.prefix_kv
    monkeypatch.setattr(module, "prefix_kv", lambda m, ids: cached.append(len(ids)) or real(m, ids))
    docs = {"d1": DOCS[0], "d2": DOCS[1], "d3": "listen and reflect", "d4": "share a story"}
    # d1 serves both queries; d2, d3 and d4 one each
    run = Run({"a": {"d1": 3.0, "d2": 2.0, "d3": 1.0}, "b": {"d1": 2.0, "d4": 1.0}})
    reused = reranker.rerank(run, docs, SESSIONS, k=3, reuse_kv=True)
    assert len(cached) == 1  # d1's prefix only: one cache, two queries
    whole = reranker.rerank(run, docs, SESSIONS, k=3, reuse_kv=False)
    assert reused.scores.keys() == whole.scores.keys()
    for q in whole.scores:
        assert reused.scores[q].keys() == whole.scores[q].keys()
        for d, v in whole.scores[q].items():
            assert reused.scores[q][d] == pytest.approx(v, abs=1e-5)
    # no document shared: no cache at all, the very scores of whole prompts
    cached.clear()
    alone = Run({"a": {"d2": 1.0, "d3": 0.5}, "b": {"d4": 1.0}})
    assert reranker.rerank(alone, docs, SESSIONS, k=3, reuse_kv=True).scores == (
        reranker.rerank(alone, docs, SESSIONS, k=3, reuse_kv=False).scores
    )
    assert cached == []


# --- the Python API's inputs: wording names, bare strings, Passages, the student's empty and
# numpy inputs


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
