from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from fakes import HashEncoder

from chatretriever.io.embeddings import EmbeddingMeta, write_embeddings
from chatretriever.retrieval.encode import EncodeConfig, encode_corpus, list_shards
from chatretriever.retrieval.index import DenseIndex, EncoderMismatchError
from chatretriever.types import Passage

pytest.importorskip("faiss")


def random_shards(tmp_path, n=300, dim=16, parts=3, model="m", seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ids = [f"d{i}" for i in range(n)]
    dirs = []
    for j, rows in enumerate(np.array_split(np.arange(n), parts)):
        meta = EmbeddingMeta(model=model, dim=dim)
        dirs.append(write_embeddings(tmp_path / f"s{j}", [ids[i] for i in rows], emb[rows], meta))
    return dirs, ids, emb


def exact_top(emb, ids, queries, k):
    scores = queries @ emb.T  # (Q, N)
    return [[ids[i] for i in np.argsort(-row, kind="stable")[:k]] for row in scores]


def test_flat_is_exact_inner_product(tmp_path):
    dirs, ids, emb = random_shards(tmp_path)
    index = DenseIndex.build(dirs)
    queries = emb[[5, 100, 250]] + 0.1
    hits = index.search(queries, k=5)
    assert [[d for d, _ in h] for h in hits] == exact_top(emb, ids, queries, 5)
    expected = float(queries[0] @ emb[ids.index(hits[0][0][0])])
    assert hits[0][0][1] == pytest.approx(expected, abs=1e-5)
    assert index.memory_bytes >= 300 * 16 * 4


def test_ties_at_the_cut_are_broken_by_id_whatever_k(tmp_path, caplog):
    # each of 20 vectors under three ids (a corpus with duplicates): every score is tied 3 ways
    rng = np.random.default_rng(1)
    base = rng.standard_normal((20, 8)).astype(np.float32)
    emb = np.repeat(base, 3, axis=0)
    ids = [f"{prefix}{i:02d}" for i in range(20) for prefix in ("z", "m", "a")]
    meta = EmbeddingMeta(model="m", dim=8, normalized=False)
    index = DenseIndex.build([write_embeddings(tmp_path / "s", ids, emb, meta)])
    queries = base[:4] + 0.05
    for k in (1, 2, 4, 7, 10, 20, 60):
        hits = index.search(queries, k=k)
        for q, h in zip(queries, hits, strict=True):
            scores = emb @ q
            expected = sorted(range(60), key=lambda i: (-scores[i], ids[i]))[:k]
            assert [d for d, _ in h] == [ids[i] for i in expected], k
    longer = index.search(queries, k=20)
    assert [h[:10] for h in longer] == index.search(queries, k=10)  # k=10 is k=20's prefix
    assert "fewer than k" not in caplog.text  # exactly k hits each time: nothing to warn about


def test_blockwise_add_shows_progress_and_keeps_the_row_order(tmp_path, monkeypatch, capsys):
    import chatretriever.retrieval.index as index_module

    dirs, ids, emb = random_shards(tmp_path, n=300, parts=2)
    monkeypatch.setattr(index_module, "ADD_BLOCK", 64)  # 150 rows per shard: 3 blocks each
    index = DenseIndex.build(dirs, show_progress=True)
    assert index.index.ntotal == 300
    np.testing.assert_array_equal(index.index.reconstruct_n(0, 300), emb)  # rows in id order
    queries = emb[[3, 140, 299]] + 0.1
    hits = index.search(queries, k=5)
    assert [[d for d, _ in h] for h in hits] == exact_top(emb, ids, queries, 5)
    assert "300/300" in capsys.readouterr().err  # the bar reached every vector


def test_save_load_round_trip(tmp_path):
    dirs, ids, emb = random_shards(tmp_path)
    index = DenseIndex.build(dirs)
    index.save(tmp_path / "idx", settings={"note": "x"})
    info = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert info["factory"] == "Flat" and info["ntotal"] == 300 and info["settings"] == {"note": "x"}
    assert info["embedding"]["model"] == "m" and info["memory_bytes"] == index.memory_bytes
    loaded = DenseIndex.load(tmp_path / "idx")
    assert loaded.ids == ids and loaded.meta == index.meta
    q = emb[:4]
    assert loaded.search(q, 7) == index.search(q, 7)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".idx")]  # temp dir gone


def test_save_replaces_an_existing_index(tmp_path):
    dirs, _, _ = random_shards(tmp_path)
    DenseIndex.build(dirs[:1]).save(tmp_path / "idx")
    DenseIndex.build(dirs).save(tmp_path / "idx")
    assert len(DenseIndex.load(tmp_path / "idx")) == 300


def test_hnsw_factory_finds_nearest_neighbours(tmp_path):
    dirs, ids, emb = random_shards(tmp_path)
    index = DenseIndex.build(dirs, factory="HNSW16")
    index.save(tmp_path / "idx")
    loaded = DenseIndex.load(tmp_path / "idx")
    assert loaded.factory == "HNSW16"
    hits = loaded.search(emb[:20], k=1, params="efSearch=64")
    assert [h[0][0] for h in hits] == ids[:20]  # each vector is its own nearest neighbour


def test_ivf_pq_is_trained_on_a_sample(tmp_path):
    dirs, ids, emb = random_shards(tmp_path, n=400)
    index = DenseIndex.build(dirs, factory="IVF4,PQ4x4", train_size=200)
    assert index.index.is_trained and len(index) == 400
    hits = index.search(emb[:10], k=10, params="nprobe=4")
    assert sum(ids[i] in {d for d, _ in h} for i, h in enumerate(hits)) >= 8
    assert index.memory_bytes < 400 * 16 * 4 + 400 * 60  # compressed codes


def test_an_approximate_index_returning_fewer_than_k_is_warned_about(tmp_path, caplog):
    """IVF with nprobe=1 searches one of 8 lists: k=100 cannot be filled, and says so."""
    dirs, ids, emb = random_shards(tmp_path, n=400)
    index = DenseIndex.build(dirs, factory="IVF8,Flat")
    with caplog.at_level("WARNING"):
        hits = index.search(emb[:5], k=100, params="nprobe=1")
    assert min(len(h) for h in hits) < 100
    assert "queries got fewer than k=100 hits" in caplog.text and "raise nprobe" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        full = index.search(emb[:5], k=100, params="nprobe=8")  # every list: exact
    assert all(len(h) == 100 for h in full) and "fewer than" not in caplog.text


def test_faiss_errors_are_one_line_value_errors(tmp_path):
    dirs, _, emb = random_shards(tmp_path, n=40)
    with pytest.raises(ValueError, match=r"^Faiss factory 'Bogus99': could not parse index string"):
        DenseIndex.build(dirs, factory="Bogus99")
    with pytest.raises(ValueError, match=r"'IVF64,Flat' cannot be trained on 40 vectors: .*\(64\)"):
        DenseIndex.build(dirs, factory="IVF64,Flat")
    flat, hnsw = DenseIndex.build(dirs), DenseIndex.build(dirs, factory="HNSW8")
    for params in ("garbage", "efSearch=zz", "efSearch=", "=3"):
        with pytest.raises(ValueError, match="expected name=number"):
            hnsw.set_search_params(params)
    with pytest.raises(ValueError, match=r"'efSearch=64' do not apply to a Flat index"):
        flat.search(emb[:1], k=3, params="efSearch=64")
    assert hnsw.search(emb[:1], k=3, params="efSearch=64")[0][0][0] == "d0"


def test_refuses_query_encoder_with_other_metadata(tmp_path):
    dirs, _, _ = random_shards(tmp_path, model="model-a")
    index = DenseIndex.build(dirs)
    index.check_encoder("model-a", 16, True)
    with pytest.raises(EncoderMismatchError, match="'model-a'.*'model-b'"):
        index.check_encoder("model-b", 16, True)
    with pytest.raises(EncoderMismatchError, match="dim 32"):
        index.check_encoder("model-a", 32, True)
    with pytest.raises(EncoderMismatchError, match="unnormalized"):
        index.check_encoder("model-a", 16, False)


def test_refuses_shards_of_two_encoders(tmp_path):
    a, _, _ = random_shards(tmp_path / "a", model="a", parts=1)
    b, _, _ = random_shards(tmp_path / "b", model="b", parts=1)
    with pytest.raises(EncoderMismatchError):
        DenseIndex.build(a + b)


def _encoded(tmp_path, encoder: HashEncoder, name: str) -> list:
    corpus = [Passage(f"p{i}", f"text number {i}") for i in range(6)]
    encode_corpus(encoder, corpus, tmp_path / name, EncodeConfig(chunk_size=3, show_progress=False))
    return list_shards([tmp_path / name])


def test_refuses_queries_of_another_model_with_the_same_name(tmp_path):
    built_by = HashEncoder()
    index = DenseIndex.build(_encoded(tmp_path, built_by, "emb"))
    loaded = DenseIndex.load(index.save(tmp_path / "idx"))
    assert loaded.meta.fingerprint == built_by.fingerprint
    loaded.check_encoder("fake-hash", 64, True, built_by.fingerprint)
    loaded.check_encoder("renamed-copy", 64, True, built_by.fingerprint)  # same content
    retrained = HashEncoder(salt="retrained")
    with pytest.raises(EncoderMismatchError, match="same name, other weights") as e:
        loaded.check_encoder(retrained.name, retrained.dim, True, retrained.fingerprint)
    assert built_by.fingerprint in str(e.value) and retrained.fingerprint in str(e.value)
    assert "\n" not in str(e.value)


def test_refuses_shards_of_a_same_named_other_model(tmp_path):
    a = _encoded(tmp_path, HashEncoder(), "a")
    b = _encoded(tmp_path, HashEncoder(salt="retrained"), "b")
    with pytest.raises(EncoderMismatchError, match="fingerprint"):
        DenseIndex.build([a[0], b[1]])


def test_an_index_saved_before_fingerprints_matches_by_name(tmp_path, caplog):
    index = DenseIndex.build(_encoded(tmp_path, HashEncoder(), "emb"))
    meta_path = index.save(tmp_path / "old") / "meta.json"
    info = json.loads(meta_path.read_text())
    del info["embedding"]["fingerprint"]  # as an older version wrote it
    meta_path.write_text(json.dumps(info))
    old = DenseIndex.load(tmp_path / "old")
    old.check_encoder("fake-hash", 64, True, HashEncoder(salt="x").fingerprint)
    assert "matched by the name 'fake-hash' only" in caplog.text
    with pytest.raises(EncoderMismatchError, match="'fake-hash'.*'other'"):
        old.check_encoder("other", 64, True, HashEncoder(name="other").fingerprint)


def test_k_larger_than_index(tmp_path):
    dirs, _, emb = random_shards(tmp_path, n=6, parts=1)
    hits = DenseIndex.build(dirs).search(emb[:1], k=50)
    assert len(hits[0]) == 6


def test_built_from_encode_output(tmp_path):
    corpus = [Passage(f"p{i}", f"text number {i}") for i in range(12)]
    cfg = EncodeConfig(chunk_size=5, show_progress=False)
    encode_corpus(HashEncoder(), corpus, tmp_path / "emb", cfg)
    index = DenseIndex.build(list_shards([tmp_path / "emb"]))
    assert index.ids == [p.id for p in corpus]
    assert index.meta.model == "fake-hash" and index.meta.count == 12


def test_load_of_a_non_index_names_the_file(tmp_path):
    from chatretriever.errors import DataFormatError

    with pytest.raises(DataFormatError, match="meta.json"):
        DenseIndex.load(tmp_path)


def test_index_module_does_not_import_torch():
    code = (
        "import sys, chatretriever.retrieval.index, chatretriever.retrieval.evaluate;"
        " print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_load_index_dispatches_on_the_recorded_backend(tmp_path):
    from chatretriever.errors import DataFormatError
    from chatretriever.retrieval.index import backend_of, load_index

    dirs, ids, emb = random_shards(tmp_path)
    DenseIndex.build(dirs).save(tmp_path / "idx")
    meta_path = tmp_path / "idx" / "meta.json"
    info = json.loads(meta_path.read_text())
    assert info["backend"] == "faiss" and backend_of(tmp_path / "idx") == "faiss"
    loaded = load_index(tmp_path / "idx")
    assert isinstance(loaded, DenseIndex) and loaded.ids == ids
    del info["backend"]  # as an older version wrote it
    meta_path.write_text(json.dumps(info))
    assert backend_of(tmp_path / "idx") == "faiss" and len(load_index(tmp_path / "idx")) == 300
    meta_path.write_text(json.dumps({**info, "backend": "qdrant"}))
    with pytest.raises(DataFormatError, match="unknown backend 'qdrant'"):
        load_index(tmp_path / "idx")
    meta_path.write_text(json.dumps({**info, "backend": "milvus"}))
    with pytest.raises(DataFormatError, match="a milvus index, not a Faiss one"):
        DenseIndex.load(tmp_path / "idx")
    with pytest.raises(DataFormatError, match="meta.json"):
        load_index(tmp_path / "nothing")


def test_milvus_without_its_extra_names_the_extra(tmp_path, monkeypatch):
    import builtins

    from chatretriever.errors import MissingExtraError
    from chatretriever.retrieval.milvus_index import MilvusIndex

    real_import = builtins.__import__

    def no_milvus(name, *args, **kwargs):
        if name.split(".")[0] in ("pymilvus", "milvus_lite"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_milvus)
    dirs, _, _ = random_shards(tmp_path)
    with pytest.raises(MissingExtraError, match=r"pymilvus.*chatretriever\[milvus\]"):
        MilvusIndex.build(dirs, str(tmp_path / "m.db"), "c")


def test_the_faiss_backend_imports_no_milvus(tmp_path):
    dirs, _, _ = random_shards(tmp_path)
    idx = str(tmp_path / "idx")
    code = (
        "import sys, numpy; from chatretriever.retrieval.index import DenseIndex;"
        " from chatretriever.retrieval.corpus_index import CorpusIndex;"
        " import chatretriever.cli.pipeline;"
        f" DenseIndex.build({[str(d) for d in dirs]!r}).save({idx!r});"
        f" CorpusIndex.load({idx!r}).index.search(numpy.ones((1, 16)), 3);"
        " print(sorted(m for m in ('pymilvus', 'milvus_lite') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_passage_id_in_two_shards_is_named_with_them(tmp_path):
    dirs, _, _ = random_shards(tmp_path, n=30, parts=3)
    with pytest.raises(ValueError, match=r"passage id 'd0' occurs in .*s0 \(twice\)"):
        DenseIndex.build([dirs[0], dirs[0]])
    meta = EmbeddingMeta(model="m", dim=16)
    rows = np.eye(16, dtype=np.float32)[:2]
    other = write_embeddings(tmp_path / "x", ["d25", "new"], rows, meta)  # d25 is in s2
    with pytest.raises(ValueError, match=r"passage id 'd25' occurs in .*s2 and .*x: give each"):
        DenseIndex.build([*dirs, other])


def test_build_takes_an_encode_job_directory_as_the_cli_does(tmp_path):
    corpus = [Passage(f"p{i}", f"text {i}") for i in range(9)]
    cfg = EncodeConfig(chunk_size=4, show_progress=False)
    out = encode_corpus(HashEncoder(), corpus, tmp_path / "emb", cfg).out_dir
    assert DenseIndex.build([out]).ids == [p.id for p in corpus]  # chunks expanded
    assert DenseIndex.build(list_shards([out])).ids == [p.id for p in corpus]
    with pytest.raises(TypeError, match="shard_dirs must be a list of directories, got a str"):
        DenseIndex.build(str(out))


def test_only_the_queries_tied_at_the_cut_are_searched_again(caplog, monkeypatch):
    from chatretriever.retrieval import ties as ties_module
    from chatretriever.retrieval.ties import top_k_with_ties

    # query 0: distinct scores; query 1: every passage scores 1.0 (a zero query, boilerplate);
    # query 2: a tie that starts only after the cut (ranks 4..100), which needs no second look
    scores = [[float(100 - i) for i in range(100)], [1.0] * 100, [4.0, 3.0, 2.0] + [1.0] * 97]
    ids = [f"d{i:03d}" for i in range(100)][::-1]  # the index's order is not the ids'
    calls = []

    def search_at(depth, rows):
        calls.append((depth, list(rows)))
        return [[(ids[i], scores[r][i]) for i in range(depth)] for r in rows]

    monkeypatch.setattr(ties_module, "TIE_LIMIT", 40)
    hits = top_k_with_ties(search_at, 3, 100, 3)
    assert calls == [(11, [0, 1, 2]), (22, [1]), (43, [1])]  # 0, 2 once; 1 up to k + the limit
    assert [d for d, _ in hits[0]] == [d for d, _ in hits[2]] == ids[:3]
    assert [d for d, _ in hits[1]] == sorted(ids[:43])[:3]  # by id among those fetched
    assert "1 queries have more than 40 passages tied at rank 3" in caplog.text


def test_an_index_from_vectors_in_memory_checks_its_encoder(tmp_path):
    enc = HashEncoder()
    passages = [Passage(f"p{i}", f"passage {i} about topic {i % 3}") for i in range(12)]
    vectors = enc.encode_passages(passages)
    index = DenseIndex.from_vectors([p.id for p in passages], vectors, enc)
    queries = vectors[[3, 7]]
    assert [h[0][0] for h in index.search(queries, k=1)] == ["p3", "p7"]
    on_disk = encode_corpus(enc, passages, tmp_path / "emb", EncodeConfig(show_progress=False))
    built = DenseIndex.build([on_disk.out_dir])
    assert index.search(queries, k=5) == built.search(queries, k=5)  # as built from shards
    index.check_encoder(enc.name, enc.dim, enc.normalize, enc.fingerprint)
    with pytest.raises(EncoderMismatchError):
        other = HashEncoder(salt="other")
        index.check_encoder(other.name, other.dim, other.normalize, other.fingerprint)
    ids = [p.id for p in passages]
    with pytest.raises(ValueError, match=rf"shape \(12, {enc.dim}\), expected \(11, {enc.dim}\)"):
        DenseIndex.from_vectors(ids[:-1], vectors, enc)
    with pytest.raises(ValueError, match="passage id 'p0' occurs in ids"):
        DenseIndex.from_vectors(["p0", *ids[1:-1], "p0"], vectors, enc)
    with pytest.raises(ValueError, match=r"ids\[0\] 'a b': ids go into run files"):
        DenseIndex.from_vectors(["a b", *ids[1:]], vectors, enc)
