"""Part (b) of `encode_speed.py`: queries/s of a Faiss Flat (exact) index against HNSW32 at
several efSearch values, with HNSW's recall@10 against the exact top 10."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from chatretriever.io.embeddings import EmbeddingMeta


def random_unit(n: int, dim: int, seed: int, block: int = 100_000) -> np.ndarray:
    """(n, dim) float32 random unit vectors, made block by block (bounded extra memory)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, block):
        x = rng.standard_normal((min(block, n - start), dim), dtype=np.float32)
        out[start : start + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def build_index(vectors: np.ndarray, factory: str) -> tuple[Any, float]:
    """A `DenseIndex` over the vectors (built as `DenseIndex.build` builds one) and its seconds."""
    import faiss

    from chatretriever.retrieval.index import DenseIndex, add_vectors

    start = time.perf_counter()
    index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    with tqdm(total=len(vectors), desc=f"build {factory}", unit="vec") as bar:
        add_vectors(index, vectors, bar)
    seconds = time.perf_counter() - start
    meta = EmbeddingMeta(model="random", dim=vectors.shape[1], normalized=True)
    ids = [str(i) for i in range(len(vectors))]
    return DenseIndex(index, ids, meta, factory), seconds


def search_rate(index: Any, queries: np.ndarray, k: int, params: str | None) -> tuple[list, float]:
    """(top-k ids per query, queries/s) of `DenseIndex.search`."""
    start = time.perf_counter()
    hits = index.search(queries, k, params)
    qps = len(queries) / (time.perf_counter() - start)
    return [[i for i, _ in h] for h in hits], qps


def real_vectors(emb_dir: str, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(index vectors, held-out query vectors, kind) from an `encode_corpus` output directory."""
    from chatretriever.io.embeddings import read_embeddings
    from chatretriever.retrieval.encode import list_shards

    shards = [read_embeddings(d) for d in list_shards([emb_dir])]
    vectors = np.concatenate([np.asarray(e, dtype=np.float32) for _, e, _ in shards])  # (N, D)
    if len(vectors) <= n_queries:
        raise SystemExit(f"{emb_dir}: {len(vectors)} vectors, not more than --queries")
    rows = np.random.default_rng(seed).permutation(len(vectors))
    kind = f"real {shards[0][2].model} passage embeddings; held-out passages as queries"
    return vectors[rows[n_queries:]], vectors[rows[:n_queries]], kind


def bench_faiss(
    vectors: np.ndarray, queries: np.ndarray, ef_search: Sequence[int], label: str, kind: str
) -> list[dict]:
    """Flat vs HNSW32 rows (one per efSearch value) on (N, D) vectors and (Q, D) queries."""
    k = 10
    n, dim = vectors.shape
    print(f"faiss: {label}: {n:,} vectors of dim {dim} ({kind}), {len(queries)} queries")
    common = {"vectors": label, "n": n, "dim": dim, "kind": kind}
    flat, flat_build = build_index(vectors, "Flat")
    exact, flat_qps = search_rate(flat, queries, k, None)
    del flat
    rows = [{**common, **_measured("Flat", flat_build, flat_qps, 1.0)}]
    hnsw, hnsw_build = build_index(vectors, "HNSW32")
    for ef in ef_search:
        found, qps = search_rate(hnsw, queries, k, f"efSearch={ef}")
        recall = np.mean([len(set(f) & set(e)) / k for f, e in zip(found, exact, strict=True)])
        index = f"HNSW32 efSearch={ef}"
        rows.append({**common, **_measured(index, hnsw_build, qps, float(recall))})
    return rows


def _measured(index: str, build_s: float, qps: float, recall: float) -> dict:
    return {
        "index": index,
        "build_s": round(build_s, 3),
        "queries_per_s": round(qps, 1),
        "recall_at_10": round(recall, 4),
    }


def run_faiss(args: argparse.Namespace, corpus_size: int, dim: int) -> list[dict]:
    """Part (b): the MTRAG-size index (real vectors with --emb, else random) and the large one."""
    rows = []
    random_kind = "random unit Gaussian vectors and queries"
    if args.emb:
        vectors, queries, kind = real_vectors(args.emb, args.queries, args.seed)
    else:
        vectors, kind = random_unit(corpus_size, dim, args.seed), random_kind
        queries = random_unit(args.queries, dim, args.seed + 1)
    rows += bench_faiss(vectors, queries, args.ef_search, "MTRAG corpus size", kind)
    del vectors
    if not args.skip_1m:
        vectors = random_unit(args.n_random, dim, args.seed)
        queries = random_unit(args.queries, dim, args.seed + 1)
        rows += bench_faiss(vectors, queries, args.ef_search, "--n-random", random_kind)
    return rows
