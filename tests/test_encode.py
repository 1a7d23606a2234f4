from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
from fakes import HashEncoder

from chatretriever.io.embeddings import read_embeddings, read_meta
from chatretriever.retrieval.encode import (
    SETTINGS,
    EncodeConfig,
    encode_chunk,
    encode_corpus,
    encode_seconds,
    list_shards,
)
from chatretriever.retrieval.shards import parse_shard
from chatretriever.types import Passage


def make_corpus(n: int) -> list[Passage]:
    # Lengths vary so that length sorting reorders passages inside batches.
    return [Passage(f"p{i:03d}", " ".join(["word"] * (i % 7) + [f"tok{i}"])) for i in range(n)]


def read_all(out_dir):
    ids, rows = [], []
    for d in list_shards([out_dir]):
        i, e, _ = read_embeddings(d)
        ids += i
        rows.append(np.asarray(e))
    return ids, np.concatenate(rows)


def test_encode_matches_direct_encoding_in_corpus_order(tmp_path):
    corpus = make_corpus(23)
    enc = HashEncoder()
    config = EncodeConfig(batch_size=4, chunk_size=10, show_progress=False)
    result = encode_corpus(enc, corpus, tmp_path / "emb", config)
    assert (result.chunks_written, result.chunks_kept, result.num_chunks) == (3, 0, 3)
    ids, emb = read_all(tmp_path / "emb")
    assert ids == [p.id for p in corpus]
    np.testing.assert_allclose(emb, HashEncoder().encode_passages(corpus), rtol=0, atol=0)
    _, _, meta = read_embeddings(tmp_path / "emb" / "chunk-00002")
    assert (meta.model, meta.dim, meta.normalized, meta.count) == ("fake-hash", 64, True, 3)
    assert meta.dtype == "float32"
    settings = json.loads((tmp_path / "emb" / SETTINGS).read_text())
    assert settings["chunk_size"] == 10 and settings["num_chunks"] == 3
    assert settings["num_passages"] == 23 and settings["model"] == "fake-hash"


def test_length_sorted_batches_keep_input_order():
    corpus = make_corpus(9)
    seen: list[list[str]] = []

    class Spy(HashEncoder):
        def encode_passages(self, passages, batch_size=16, show_progress=False):
            seen.append([p.id for p in passages])
            return super().encode_passages(passages)

    out = encode_chunk(Spy(), corpus, EncodeConfig(batch_size=3, show_progress=False))
    np.testing.assert_array_equal(out, HashEncoder().encode_passages(corpus))
    lengths = [len(p.text) for p in corpus]
    first = [lengths[int(i[1:])] for i in seen[0]]
    assert min(first) >= max(lengths[int(i[1:])] for b in seen[1:] for i in b)  # longest first


def test_a_corpus_index_given_as_shards_points_at_its_embeddings(tmp_path):
    config = EncodeConfig(batch_size=5, chunk_size=10, show_progress=False)
    encode_corpus(HashEncoder(), make_corpus(5), tmp_path / "idx" / "embeddings", config)
    (tmp_path / "idx" / "index").mkdir()
    with pytest.raises(ValueError, match=r"no chunk-\* dirs\): a corpus index, whose embed"):
        list_shards([tmp_path / "idx"])
    assert len(list_shards([tmp_path / "idx" / "embeddings"])) == 1
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match=r"no chunk-\* dirs\)$"):
        list_shards([tmp_path / "other"])


@pytest.mark.parametrize("damage", ["no vectors", "ids cut short", "rows cut short"])
def test_a_damaged_chunk_is_encoded_again(tmp_path, caplog, damage):
    """A partial copy (a chunk's vectors or some of its ids missing) is not kept as finished."""
    corpus = make_corpus(25)
    config = EncodeConfig(batch_size=5, chunk_size=10, show_progress=False)
    encode_corpus(HashEncoder(), corpus, tmp_path / "emb", config)
    chunk = tmp_path / "emb" / "chunk-00001"
    if damage == "no vectors":
        (chunk / "embeddings.npy").unlink()
    elif damage == "ids cut short":
        ids = (chunk / "ids.txt").read_text().splitlines()
        (chunk / "ids.txt").write_text("\n".join(ids[:4]) + "\n")
    else:
        np.save(chunk / "embeddings.npy", np.load(chunk / "embeddings.npy")[:3])
    again = HashEncoder()
    with caplog.at_level("WARNING"):
        result = encode_corpus(again, corpus, tmp_path / "emb", config)
    assert "chunk-00001 is damaged" in caplog.text
    assert (result.chunks_written, result.chunks_kept, again.passages_encoded) == (1, 2, 10)
    ids, emb = read_all(tmp_path / "emb")
    assert ids == [p.id for p in corpus]
    np.testing.assert_array_equal(emb, HashEncoder().encode_passages(corpus))


def test_killed_encoding_resumes_without_recomputing(tmp_path):
    corpus = make_corpus(25)
    config = EncodeConfig(batch_size=5, chunk_size=10, show_progress=False)
    crashing = HashEncoder(fail_after_batches=3)  # chunk 0 = 2 batches; dies inside chunk 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        encode_corpus(crashing, corpus, tmp_path / "emb", config)
    assert (tmp_path / "emb" / "chunk-00000").is_dir()
    assert not (tmp_path / "emb" / "chunk-00001").exists()  # never half-written
    assert not [p for p in (tmp_path / "emb").iterdir() if p.name.startswith(".chunk")]
    with pytest.raises(ValueError, match="unfinished"):
        list_shards([tmp_path / "emb"])

    second = HashEncoder()
    result = encode_corpus(second, corpus, tmp_path / "emb", config)
    assert second.passages_encoded == 15  # chunks 1 and 2 only
    assert (result.chunks_written, result.chunks_kept) == (2, 1)
    ids, emb = read_all(tmp_path / "emb")
    assert ids == [p.id for p in corpus]
    np.testing.assert_array_equal(emb, HashEncoder().encode_passages(corpus))

    third = HashEncoder()
    assert encode_corpus(third, corpus, tmp_path / "emb", config).chunks_kept == 3
    assert third.passages_encoded == 0


def test_a_passage_whose_text_changed_is_encoded_again(tmp_path):
    corpus, emb_dir = make_corpus(25), tmp_path / "emb"
    config = EncodeConfig(batch_size=5, chunk_size=10, show_progress=False)
    encode_corpus(HashEncoder(), corpus, emb_dir, config)
    changed = list(corpus)
    changed[13] = Passage("p013", "emperor penguins live in antarctica")  # chunk 1, same id
    changed[24] = Passage("p024", changed[24].text, title="now with a title")  # chunk 2
    enc = HashEncoder()
    result = encode_corpus(enc, changed, emb_dir, config)
    assert (result.chunks_written, result.chunks_kept) == (2, 1)
    assert enc.passages_encoded == 15  # chunks 1 and 2; chunk 0 is unchanged
    ids, emb = read_all(emb_dir)
    np.testing.assert_array_equal(emb, HashEncoder().encode_passages(changed))
    # a chunk written before digests were recorded is kept by its ids (old directories resume)
    meta_path = emb_dir / "chunk-00000" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["extra"]["content"]
    meta_path.write_text(json.dumps(meta))
    assert encode_corpus(HashEncoder(), changed, emb_dir, config).chunks_kept == 3


class SlowEncoder(HashEncoder):
    """0.02 s per batch: chunk times that rounding (to 1 ms) cannot hide."""

    def encode_passages(self, passages, batch_size=32, show_progress=False):
        time.sleep(0.02)
        return super().encode_passages(passages, batch_size, show_progress)


def test_each_chunk_keeps_its_encoding_time_across_killed_runs(tmp_path):
    corpus, emb_dir = make_corpus(25), tmp_path / "emb"
    config = EncodeConfig(batch_size=5, chunk_size=10, show_progress=False)
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies inside chunk 1
        encode_corpus(SlowEncoder(fail_after_batches=3), corpus, emb_dir, config)
    first = read_meta(emb_dir / "chunk-00000").extra["seconds"]
    assert first > 0  # recorded (two batches); no timing bound in a unit test
    assert encode_seconds(emb_dir) == pytest.approx(first)

    encode_corpus(SlowEncoder(), corpus, emb_dir, config)
    seconds = [read_meta(path).extra["seconds"] for path in list_shards([emb_dir])]
    assert seconds[0] == first  # the killed run's chunk was kept with its time
    assert seconds[1] > 0 and seconds[2] > 0  # each later chunk records its own time
    assert encode_seconds(emb_dir) == pytest.approx(sum(seconds))


def test_shards_split_the_corpus_deterministically(tmp_path):
    corpus = make_corpus(35)
    encoders = [HashEncoder(), HashEncoder(), HashEncoder()]
    for i, enc in enumerate(encoders):
        cfg = EncodeConfig(batch_size=4, chunk_size=10, shard=(i, 3), show_progress=False)
        encode_corpus(enc, corpus, tmp_path / "emb", cfg)
    assert [e.passages_encoded for e in encoders] == [15, 10, 10]  # chunks {0, 3}, {1}, {2}
    ids, emb = read_all(tmp_path / "emb")
    assert ids == [p.id for p in corpus]
    np.testing.assert_array_equal(emb, HashEncoder().encode_passages(corpus))


def test_only_some_shards_done_is_refused_when_indexing(tmp_path):
    cfg = EncodeConfig(chunk_size=10, shard=(1, 2), show_progress=False)
    encode_corpus(HashEncoder(), make_corpus(30), tmp_path / "emb", cfg)
    with pytest.raises(ValueError, match="1 of 3 chunks"):
        list_shards([tmp_path / "emb"])


def test_other_model_or_chunk_size_is_refused(tmp_path):
    corpus = make_corpus(5)
    encode_corpus(HashEncoder(), corpus, tmp_path / "emb", EncodeConfig(show_progress=False))
    with pytest.raises(ValueError, match="model='fake-hash'"):
        encode_corpus(HashEncoder(name="other"), corpus, tmp_path / "emb")
    with pytest.raises(ValueError, match="chunk_size"):
        encode_corpus(HashEncoder(), corpus, tmp_path / "emb", EncodeConfig(chunk_size=2))


def test_resume_refuses_another_model_of_the_same_name(tmp_path):
    corpus, emb_dir = make_corpus(5), tmp_path / "emb"
    cfg = EncodeConfig(chunk_size=2, show_progress=False)
    first = HashEncoder()
    encode_corpus(first, corpus, emb_dir, cfg)
    assert json.loads((emb_dir / SETTINGS).read_text())["fingerprint"] == first.fingerprint
    assert read_meta(emb_dir / "chunk-00002").fingerprint == first.fingerprint
    retrained = HashEncoder(salt="retrained")  # same name, other vectors: retrained in place
    expected = (
        rf"model='fake-hash' \(fingerprint {first.fingerprint}\), not of model='fake-hash' "
        rf"\(fingerprint {retrained.fingerprint}\)"
    )
    with pytest.raises(ValueError, match=expected):
        encode_corpus(retrained, corpus, emb_dir, cfg)
    assert retrained.passages_encoded == 0  # nothing mixed in


def test_a_dir_encoded_before_fingerprints_resumes_by_name(tmp_path, caplog):
    corpus, emb_dir = make_corpus(6), tmp_path / "emb"
    cfg = EncodeConfig(chunk_size=2, show_progress=False)
    encode_corpus(HashEncoder(), corpus, emb_dir, cfg)
    for path in [emb_dir / SETTINGS, *emb_dir.glob("chunk-*/meta.json")]:  # as an old version
        data = json.loads(path.read_text())
        del data["fingerprint"]
        path.write_text(json.dumps(data))
    shutil.rmtree(emb_dir / "chunk-00002")  # the old job was interrupted
    again = HashEncoder()
    result = encode_corpus(again, corpus, emb_dir, cfg)
    assert (result.chunks_kept, result.chunks_written, again.passages_encoded) == (2, 1, 2)
    assert "matched by the name 'fake-hash' only" in caplog.text
    with pytest.raises(ValueError, match="model='fake-hash'.*model='other'"):
        encode_corpus(HashEncoder(name="other"), corpus, emb_dir, cfg)


def test_changed_corpus_is_refused(tmp_path):
    cfg = EncodeConfig(chunk_size=4, show_progress=False)
    encode_corpus(HashEncoder(), make_corpus(8), tmp_path / "emb", cfg)
    changed = [Passage("new", "x"), *make_corpus(8)[1:]]
    with pytest.raises(ValueError, match="this one changed"):
        encode_corpus(HashEncoder(), changed, tmp_path / "emb", cfg)


def test_shard_jobs_on_different_corpora_are_not_mixed(tmp_path):
    cfg = [EncodeConfig(chunk_size=4, shard=(i, 2), show_progress=False) for i in (0, 1)]
    corpus = make_corpus(16)
    other = [Passage(p.id, p.text + " edited") for p in corpus]  # same ids, other texts
    emb = tmp_path / "emb"
    encode_corpus(HashEncoder(), corpus, emb, cfg[0])  # chunks 0 and 2
    # shard jobs that ran at once, on two machines, on different corpora: gathered into one
    # directory, each chunk is complete, but together they are no corpus: index refuses
    encode_corpus(HashEncoder(), other, tmp_path / "there", cfg[1])
    mixed = tmp_path / "mixed"
    shutil.copytree(emb, mixed)
    for chunk in (tmp_path / "there").glob("chunk-*"):
        shutil.copytree(chunk, mixed / chunk.name)
    with pytest.raises(ValueError, match="do not make up the corpus its last encode job read"):
        list_shards([mixed])
    # one after the other into one directory: a corpus of other ids is refused at the other
    # shard's first chunk, before this shard writes anything
    late = HashEncoder()
    renamed = [Passage(f"x{p.id}", p.text) for p in corpus]
    with pytest.raises(ValueError, match="chunk-00000 holds other passage ids than this corpus"):
        encode_corpus(late, renamed, emb, cfg[1])
    assert late.passages_encoded == 0
    # the same ids with edited texts: each shard re-encodes its own chunks when rerun, and
    # index refuses the directory until every shard has
    encode_corpus(HashEncoder(), other, emb, cfg[1])
    with pytest.raises(ValueError, match="do not make up the corpus its last encode job read"):
        list_shards([emb])
    again = HashEncoder()
    encode_corpus(again, other, emb, cfg[0])
    assert again.passages_encoded == 8  # chunks 0 and 2, encoded again
    ids, vectors = read_all(emb)
    assert ids == [p.id for p in other]
    np.testing.assert_array_equal(vectors, HashEncoder().encode_passages(other))


def test_gathered_chunks_without_settings_must_have_no_gap(tmp_path, caplog):
    emb = tmp_path / "emb"
    encode_corpus(
        HashEncoder(), make_corpus(12), emb, EncodeConfig(chunk_size=4, show_progress=False)
    )
    (emb / SETTINGS).unlink()  # chunk dirs collected from several machines
    assert len(list_shards([emb])) == 3
    assert "whether chunks after the last are missing cannot be told" in caplog.text
    shutil.copytree(emb / "chunk-00001", emb / "chunk-00001.bak")  # a copy is no chunk
    assert len(list_shards([emb])) == 3
    shutil.rmtree(emb / "chunk-00001")
    with pytest.raises(ValueError, match="up to chunk-00002 but not chunk-00001"):
        list_shards([emb])


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "-1/3"])
def test_parse_shard_rejects_bad_values(text):
    with pytest.raises(ValueError):
        parse_shard(text)


def test_parse_shard():
    assert parse_shard("2/4") == (2, 4)
