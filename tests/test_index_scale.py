"""benchmarks/index_scale.py (and its package benchmarks/_index_scale) at tiny sizes on synthetic
seed embeddings (dim 32)."""

from __future__ import annotations

import importlib
import json
import sys
import types

import numpy as np
import pytest
from test_benchmarks import load_benchmark

from chatretriever.io.embeddings import EmbeddingMeta, read_embeddings, write_embeddings

pytest.importorskip("faiss")

DIM = 32


@pytest.fixture(scope="module")
def scale():
    """The script; loading it puts benchmarks/ on sys.path, beside its package _index_scale."""
    return load_benchmark("index_scale")


@pytest.fixture(scope="module")
def vectors(scale):
    return importlib.import_module("_index_scale.vectors")


@pytest.fixture(scope="module")
def memory(scale):
    return importlib.import_module("_index_scale.memory")


@pytest.fixture(scope="module")
def systems(scale):
    return importlib.import_module("_index_scale.systems")


@pytest.fixture
def emb(tmp_path):
    """1,500 clustered unit vectors in two shards: the "real" seed embeddings."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((40, DIM))
    x = centers[rng.integers(0, 40, 1500)] + 0.4 * rng.standard_normal((1500, DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    meta = EmbeddingMeta(model="seed", dim=DIM, fingerprint="f00d")
    root = tmp_path / "emb"
    for c, rows in enumerate((range(0, 700), range(700, 1500))):
        ids = [f"p{i}" for i in rows]
        write_embeddings(root / f"chunk-{c:05d}", ids, x[rows.start : rows.stop], meta)
    return root


def tiny_argv(emb, out, *extra):
    return [
        "--emb", str(emb), "--out", str(out), "--sizes", "20000", "--queries", "100",
        "--single", "10", "--block", "6000", "--threads", "1", "--hnsw-m", "16",
        "--ef-construction", "40", "--ef-search", "8", "64", "--nlist", "32", "--pq-m", "8",
        "--nprobe", "2", "16", "--rerank", "0", "50", "--train-size", "8000", *extra,
    ]  # fmt: skip


def test_end_to_end_json_table_plot_and_cached_rerun(scale, emb, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "chatretriever.retrieval.milvus_index", None)  # absent
    out = tmp_path / "out"
    argv = tiny_argv(emb, out, "--systems", "flat", "hnsw", "ivfpq-rerank", "milvus")
    assert scale.main(argv) == 0
    result = json.loads((out / "index_scale.json").read_text())
    assert result["k"] == 10 and result["set"]["base_passages"] == 1400
    assert result["set"]["dim"] == DIM and result["set"]["noise_shape"] == "covariance"
    (size,) = result["sizes"]
    st = size["structure"]
    assert size["n"] == 20000 and st["copies_per_passage"] == pytest.approx(20000 / 1400, 0.01)
    assert 0 < st["copy_rate"] <= st["copy_rate_max"] <= 1 and 0 < st["real_neighbour_rate"] <= 1
    assert 0.9 < st["cosine_to_generator"] < 1
    rows = size["rows"]
    assert {r["system"] for r in rows} == {"flat", "hnsw", "ivfpq-rerank", "milvus"}
    (milvus,) = [r for r in rows if r["system"] == "milvus"]
    assert milvus["status"].startswith("skipped: chatretriever.retrieval.milvus_index")
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 1 + 2 + 2 * 2
    for r in ok:
        assert 0 <= r["recall_at_k"] <= 1 and r["qps_batched"] > 0 and r["qps_single"] > 0
        assert r["build_s"] >= 0 and r["model_bytes"] > 0 and not r["reused"]
    (flat,) = [r for r in ok if r["system"] == "flat"]
    assert flat["recall_at_k"] == 1.0 and flat["model_bytes_per_vector"] == 4 * DIM
    hnsw = {r["setting"]: r["recall_at_k"] for r in ok if r["system"] == "hnsw"}
    assert hnsw["efSearch=64"] >= hnsw["efSearch=8"]
    ivf = {(r["nprobe"], r["rerank_depth"]): r for r in ok if r["system"] == "ivfpq-rerank"}
    for nprobe in (2, 16):
        # the fp16 memmap re-ranking of 50 PQ candidates finds more of the exact top 10
        assert ivf[nprobe, 50]["recall_at_k"] > ivf[nprobe, 0]["recall_at_k"]
        assert ivf[nprobe, 50]["rerank_dtype"] == "float16"
    # 8 code bytes + an 8-byte id a vector; 32 + 256 centroids of 32 floats over 20,000 vectors
    assert ivf[2, 0]["model_bytes_per_vector"] == round(16 + 4 * DIM * (32 + 256) / 20000, 1)
    assert result["targets"]["hnsw_1m"]["met"] is None  # 1M was not measured
    md = (out / "index_scale.md").read_text()
    assert "| system | build | search |" in md and "skipped: chatretriever" in md
    assert result["command"] in md and result["command"] in capsys.readouterr().out
    assert (out / "index_scale.png").read_bytes()[:4] == b"\x89PNG"
    store = np.load(next((out / "cache").glob("store-*.npy")), mmap_mode="r")
    assert store.shape == (20000, DIM) and store.dtype == np.float16

    # A rerun reuses the cached HNSW and IVF indexes and the exact top k: same recalls.
    assert scale.main(tiny_argv(emb, out, "--systems", "hnsw", "ivfpq-rerank")) == 0
    again = json.loads((out / "index_scale.json").read_text())["sizes"][0]["rows"]
    assert all(r["reused"] for r in again)
    before = {(r["series"], r["setting"]): r["recall_at_k"] for r in ok if r["system"] != "flat"}
    assert {(r["series"], r["setting"]): r["recall_at_k"] for r in again} == before


class FakeMilvusIndex:
    """Exact numpy search over the shards it is built from; records how it was called."""

    calls: list = []

    def __init__(self, ids, vectors):
        self.ids, self.vectors = ids, vectors
        self.memory_bytes = vectors.nbytes

    @classmethod
    def build(cls, shard_dirs, uri, collection, index_spec="FLAT", show_progress=False):
        cls.calls.append((len(shard_dirs), uri, collection, index_spec))
        shards = [read_embeddings(d) for d in shard_dirs]
        ids = [i for s in shards for i in s[0]]
        return cls(ids, np.concatenate([np.asarray(s[1]) for s in shards]))

    def search(self, queries, k, params):
        scores = queries @ self.vectors.T
        top = np.argsort(-scores, axis=1)[:, :k]
        return [
            [(self.ids[j], float(s[j])) for j in row] for row, s in zip(top, scores, strict=True)
        ]


def test_milvus_row_through_the_backend_surface(scale, emb, tmp_path, monkeypatch):
    module = types.ModuleType("chatretriever.retrieval.milvus_index")
    module.MilvusIndex = FakeMilvusIndex
    FakeMilvusIndex.calls = []
    monkeypatch.setitem(sys.modules, module.__name__, module)
    out = tmp_path / "out"
    argv = tiny_argv(emb, out, "--systems", "milvus", "--milvus-index", "FLAT")
    assert scale.main([*argv, "--milvus-params", "ef=1", "ef=2"]) == 0
    rows = json.loads((out / "index_scale.json").read_text())["sizes"][0]["rows"]
    assert [(r["setting"], r["recall_at_k"]) for r in rows] == [("ef=1", 1.0), ("ef=2", 1.0)]
    assert rows[0]["model_bytes"] == 20000 * DIM * 4
    ((n_shards, uri, collection, spec),) = FakeMilvusIndex.calls
    assert n_shards == 4 and uri.endswith("milvus.db") and spec == "FLAT"  # 20000 / 6000 -> 4
    assert collection.startswith("index_scale_") and collection.endswith("_n20000")


def test_rows_that_do_not_fit_are_skipped(scale, memory, emb, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 2**20)  # 1 MiB free
    out = tmp_path / "out"
    assert scale.main(tiny_argv(emb, out, "--systems", "flat", "hnsw")) == 0
    rows = json.loads((out / "index_scale.json").read_text())["sizes"][0]["rows"]
    assert [r["system"] for r in rows] == ["flat", "hnsw"]
    for r in rows:  # 20000 x 128 bytes (Flat) > 80% of 1 MiB
        assert r["status"] == "skipped: needs 0.0 GiB by the model, 0.0 GiB available"


def test_embeddings_found_or_how_to_make_them(scale, vectors, emb, tmp_path):
    chunks = [emb / "chunk-00000", emb / "chunk-00001"]
    assert vectors.find_embeddings(str(emb)) == chunks
    assert vectors.find_embeddings(str(tmp_path)) == chunks  # a folder holding one encode output
    with pytest.raises(SystemExit, match="chatretriever encode .* --out"):
        scale.main(["--emb", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    (tmp_path / "other" / "chunk-00000").mkdir(parents=True)
    with pytest.raises(SystemExit, match="several embedding sets"):
        vectors.find_embeddings(str(tmp_path))


def test_memory_models_by_hand(memory, systems):
    # HNSW32 over 576-d fp32: 2304 code bytes + 4 * (64 + 32/31) neighbour bytes + 4 + 8
    assert memory.hnsw_bytes_per_vector(576, 32, 2304) == pytest.approx(2576.129, abs=1e-3)
    # IVF16384,PQ64 at 10M: (64 + 8) bytes a vector + (16384 + 256) centroids of 576 floats
    assert memory.ivfpq_bytes(10**7, 576, 16384, 64, 8, False) == 720_000_000 + 38_338_560
    assert systems.nlist_for(1_000_000) == 4096 and systems.nlist_for(10_000_000) == 16384
    assert systems.nlist_for(20_000) == 512  # at most n / 39 training points a list


def test_sets_are_streamed_prefixes_with_the_noise_asked_for(vectors):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    real = vectors.RealVectors(x[:250], x[250:], "m", None)
    for shape in ("covariance", "isotropic"):
        sset = vectors.make_set(real, 0.5, shape, seed=3, block=1000)
        start, big = sset.block_rows(1, 5000)
        assert start == 1000 and big.shape == (1000, DIM)
        np.testing.assert_array_equal(sset.block_rows(1, 1200)[1], big[:200])  # a prefix
        np.testing.assert_allclose(np.linalg.norm(big, axis=1), 1.0, atol=1e-5)
        # noise of norm 0.5 x the median nearest-neighbour distance, in expectation
        z = np.random.default_rng(0).standard_normal((20000, DIM), dtype=np.float32)
        noise = sset.factor * (z if sset.basis is None else z @ sset.basis)
        nn = vectors.nn_distance(real.base, seed=3)
        assert sset.noise_norm == pytest.approx(0.5 * nn)
        assert np.sqrt(np.mean(np.sum(noise**2, axis=1))) == pytest.approx(0.5 * nn, rel=0.03)
        assert not np.isin(sset.queries().round(5), big.round(5)).all(axis=1).any()


def test_rerank_and_recall_by_hand(systems):
    store = np.array([[1, 0], [0, 1], [0.6, 0.8], [0.8, 0.6]], dtype=np.float16)
    queries = np.array([[1, 0], [0, 1]], dtype=np.float32)
    cand = np.array([[1, 2, 3, -1], [0, 3, -1, -1]])
    # query 0: rows 3 (0.8), 2 (0.6), 1 (0); query 1: rows 3 (0.6), 0 (0), then none
    np.testing.assert_array_equal(systems.rerank(store, queries, cand, 3), [[3, 2, 1], [3, 0, -1]])
    truth = np.array([[0, 3], [1, 2]])
    found = np.array([[3, 2], [2, 1]])
    assert systems.recall_at_k(found, truth) == pytest.approx((1 / 2 + 2 / 2) / 2)
