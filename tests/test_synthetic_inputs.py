"""Synthetic pairs as a demanding user runs them: the question cache follows the model's weights,
bad corpora are one clear error, a too-large n is said, duplicate passages give one example
(inline corpora, a fake generator, a weight file written in the test)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chatretriever.cli import main
from chatretriever.io.training import read_training_examples
from chatretriever.retrieval.training_data import synthetic
from chatretriever.retrieval.training_data.synthetic import SyntheticConfig, synthetic_examples
from chatretriever.types import Passage

pytest.importorskip("bm25s")

FILLER = "is described here in enough plain words for the builder to sample it " * 2
TOPICS = ["volcano lava", "penguin ice", "violin bow", "glacier valley"]


def _corpus_rows(topics=TOPICS):
    return [{"_id": f"p{i}", "text": f"{t} {t} {FILLER}"} for i, t in enumerate(topics)]


def _fake_llm(calls):
    def generate(chats):
        calls.append(len(chats))
        return [f"what is {' '.join(c[-1]['content'].split()[:2])} here?" for c in chats]

    return generate


@pytest.fixture
def fake_llm(monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(synthetic, "hf_batch_generator", lambda name: _fake_llm(calls))
    return calls


def _write_weights(model_dir, value):
    from safetensors.numpy import save_file

    model_dir.mkdir(exist_ok=True)
    save_file({"w": np.full((2, 2), value, dtype=np.float32)}, str(model_dir / "model.safetensors"))


def test_cache_is_keyed_by_the_model_weights_not_only_its_name(tmp_path):
    corpus = [Passage(r["_id"], r["text"]) for r in _corpus_rows()]
    cache, calls = tmp_path / "q.jsonl", []
    for fp, total in [("aaa", 4), ("aaa", 4), ("bbb", 8), (None, 12), (None, 12)]:
        config = SyntheticConfig(n=4, model="m", model_fingerprint=fp, min_words=5)
        synthetic_examples(corpus, _fake_llm(calls), config, cache, show_progress=False)
        assert sum(calls) == total  # the same weights: cached; other weights: generated


def test_cli_model_retrained_in_place_writes_new_questions(tmp_path, fake_llm):
    model, corpus, out = tmp_path / "llm", tmp_path / "c.jsonl", tmp_path / "o.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in _corpus_rows()))
    args = ["build-train", "synthetic", str(corpus), "--model", str(model), "--out", str(out)]
    args += ["--n", "4", "--negatives", "0", "--no-progress"]
    _write_weights(model, 0.0)
    assert main(args) == 0 and sum(fake_llm) == 4
    first = out.read_bytes()
    assert main(args) == 0 and sum(fake_llm) == 4 and out.read_bytes() == first  # all cached
    _write_weights(model, 1.0)  # retrained, same directory
    assert main(args) == 0 and sum(fake_llm) == 8


@pytest.mark.parametrize(
    "rows",
    [[], [{"_id": "a", "text": ""}], [{"_id": "a", "text": "too short to ask about"}]],
    ids=["empty", "blank", "short"],
)
def test_cli_corpus_without_a_usable_passage_is_one_clear_error(tmp_path, capsys, fake_llm, rows):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o.jsonl"
    args = ["build-train", "synthetic", str(corpus), "--out", str(out), "--no-progress"]
    assert main([*args, "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{corpus}: none of its {len(rows)} passages has at least 20 words" in err
    assert "Traceback" not in err and not out.exists() and fake_llm == []


def test_n_larger_than_the_corpus_keeps_what_there_is_and_says_so(caplog):
    corpus = [Passage(r["_id"], r["text"]) for r in _corpus_rows()]
    config = SyntheticConfig(n=50, min_words=5)
    got = synthetic_examples(corpus, _fake_llm([]), config, show_progress=False, corpus_name="c")
    assert len(got) == 4
    assert "c: 4 synthetic pairs, fewer than n=50" in caplog.text


def test_passages_with_the_same_text_give_one_example():
    rows = _corpus_rows()
    corpus = [Passage(r["_id"], r["text"]) for r in rows]
    corpus.append(Passage("copy-of-p0", "  " + rows[0]["text"].upper()))
    got = synthetic_examples(corpus, _fake_llm([]), SyntheticConfig(n=10, min_words=5), None)
    texts = [" ".join(e.positives[0].text.split()).casefold() for e in got]
    assert len(got) == 4 and len(set(texts)) == 4


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match="top_k must be at least 1, got 0"):
        SyntheticConfig(n=1, top_k=0)


def test_cli_output_is_the_same_file_with_the_same_seed(tmp_path, fake_llm):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in _corpus_rows()))
    _write_weights(tmp_path / "llm", 0.0)
    outs = []
    for name in ("a.jsonl", "b.jsonl"):  # separate caches: both generate
        out = tmp_path / name
        args = ["build-train", "synthetic", str(corpus), "--model", str(tmp_path / "llm")]
        assert (
            main([*args, "--out", str(out), "--n", "3", "--negatives", "1", "--no-progress"]) == 0
        )
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and len(read_training_examples(tmp_path / "a.jsonl")) == 3
    for ex in read_training_examples(tmp_path / "a.jsonl"):  # never the positive as a negative
        assert all(n.id != ex.positives[0].id for n in ex.negatives)
