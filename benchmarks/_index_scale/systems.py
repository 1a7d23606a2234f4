"""The systems measured: Faiss Flat, HNSW, IVF-PQ re-ranked from the on-disk store, Milvus.

Each runner takes the script's arguments and a `Context` (what every system of one size shares)
and returns table rows: build seconds, RSS change, bytes/vector model, queries/s, recall@k.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from _index_scale.memory import hnsw_bytes_per_vector, ivfpq_bytes, rss_bytes, too_big
from _index_scale.vectors import SyntheticSet, settings_hash
from chatretriever.errors import MissingExtraError, require_extra
from chatretriever.io.atomic import atomic_path
from chatretriever.io.embeddings import EmbeddingMeta, write_embeddings
from chatretriever.retrieval.evaluate import write_json
from chatretriever.retrieval.index import add_vectors

SYSTEMS = ("flat", "hnsw", "ivfpq-rerank", "milvus")
Search = Callable[[np.ndarray], np.ndarray]  # (Q, D) queries -> (Q, k) rows, -1 for none


@dataclass
class Built:
    """A built (or reloaded) index and what its build took."""

    index: Any
    train_s: float
    add_s: float
    generate_s: float
    rss_delta: int
    reused: bool


@dataclass(frozen=True)
class Context:
    """What every system of one size shares."""

    sset: SyntheticSet
    n: int
    queries: np.ndarray  # (Q, D)
    truth: np.ndarray  # (Q, k) exact rows
    k: int
    single: int
    cache: Path | None  # where Faiss indexes are kept (None: not kept)
    store: np.ndarray | None  # (n, D) memmap of the vectors, for re-ranking


def load_faiss() -> Any:
    """The faiss module (MissingExtraError naming the extra when it is not installed)."""
    return require_extra("faiss", "faiss", "the index benchmark")


def build_faiss(
    ctx: Context, factory: str, configure: Callable, train_size: int, keep: bool = True
) -> Built:
    """A Faiss inner-product index over the set, trained on its first rows when it needs it;
    with `keep`, saved to the cache and reloaded from it when built with the same settings
    (`configure`'s repr is one of them)."""
    faiss = load_faiss()
    settings = [ctx.sset.key, ctx.n, factory, train_size, faiss.__version__, repr(configure)]
    name = f"{factory.replace(',', '-')}-{settings_hash(settings)}-n{ctx.n}.faiss"
    path = ctx.cache / name if ctx.cache and keep else None
    rss0 = rss_bytes()
    if path and path.exists():
        info = json.loads(path.with_suffix(".json").read_text())
        index = faiss.read_index(str(path))
        return Built(index, info["train_s"], info["add_s"], 0.0, rss_bytes() - rss0, True)
    start = time.perf_counter()
    index = faiss.index_factory(ctx.sset.dim, factory, faiss.METRIC_INNER_PRODUCT)
    configure(index)
    train_s = add_s = 0.0
    if not index.is_trained:
        sample = ctx.sset.head(min(train_size, ctx.n))
        t = time.perf_counter()
        index.train(sample)
        train_s, sample = time.perf_counter() - t, None
    add_s = _add_all(ctx, index, factory)
    generate_s = time.perf_counter() - start - train_s - add_s
    built = Built(index, train_s, add_s, generate_s, rss_bytes() - rss0, False)
    if path:
        with atomic_path(path) as tmp:
            faiss.write_index(index, str(tmp))
        write_json(path.with_suffix(".json"), {"train_s": train_s, "add_s": add_s})
    return built


def _add_all(ctx: Context, index: Any, factory: str) -> float:
    """Add every vector of the set (generated block by block); returns the seconds adding."""
    add_s = 0.0
    with tqdm(total=ctx.n, desc=f"add {factory}", unit="vec", unit_scale=True) as bar:
        for _, x in ctx.sset.blocks(ctx.n, None):
            t = time.perf_counter()
            add_vectors(index, x, bar)  # in blocks of 20,000: the bar moves during HNSW builds
            add_s += time.perf_counter() - t
    return add_s  # the last block is freed here, before the RSS is read


@dataclass(frozen=True)
class EfConstruction:
    """Sets an HNSW index's efConstruction (its repr names the cached index)."""

    ef: int

    def __call__(self, index: Any) -> None:
        index.hnsw.efConstruction = self.ef


@dataclass(frozen=True)
class IvfSettings:
    """Sets the k-means iterations of an IVF index's coarse quantizer and turns polysemous
    PQ training off (Faiss's IVFPQ default: minutes of training for Hamming filtering, which
    this benchmark does not use)."""

    kmeans_iters: int

    def __call__(self, index: Any) -> None:
        load_faiss().extract_index_ivf(index).cp.niter = self.kmeans_iters
        if hasattr(index, "do_polysemous_training"):  # IndexIVFPQ (not the fast-scan one)
            index.do_polysemous_training = False


def faiss_search(index: Any, params: str | None, k: int) -> Search:
    """Top-k rows of a Faiss index under search parameters ("efSearch=64", "nprobe=16")."""
    if params:
        load_faiss().ParameterSpace().set_index_parameters(index, params)
    return lambda q: index.search(q, k)[1]


def rerank(store: np.ndarray, queries: np.ndarray, cand: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) rows: the candidates (Q, K') ordered by inner product with their stored vectors.

    One query at a time, its rows read from the memmap in file order: small arrays that the
    allocator reuses (large fresh ones cost page faults, slow on a VM), bounded at any depth.
    """
    out = np.full((len(cand), k), -1, dtype=np.int64)
    for i, c in enumerate(cand):
        rows = np.sort(c[c >= 0])  # (K',)
        vectors = np.asarray(store[rows], dtype=np.float32)  # (K', D)
        # einsum, not BLAS: a threaded gemv per query costs milliseconds on a busy machine
        scores = np.einsum("kd,d->k", vectors, queries[i])  # (K',)
        top = np.lexsort((rows, -scores))[:k]  # ties: lower row first
        out[i, : len(top)] = rows[top]
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's exact top k (Q, k) found in its k results (Q, k)."""
    k = truth.shape[1]
    return float(np.mean([np.isin(t, f[:k]).sum() / k for f, t in zip(found, truth, strict=True)]))


def measure(search: Search, ctx: Context) -> dict[str, float]:
    """queries/s batched (all queries in one call) and single (one a call), and recall@k."""
    search(ctx.queries[:8])  # warm-up: first-call costs, pages of the index and store
    start = time.perf_counter()
    found = search(ctx.queries)
    batched = len(ctx.queries) / (time.perf_counter() - start)
    single = min(ctx.single, len(ctx.queries))
    start = time.perf_counter()
    for i in range(single):
        search(ctx.queries[i : i + 1])
    per_single = single / (time.perf_counter() - start) if single else float("nan")
    return {
        "qps_batched": round(batched, 1),
        "qps_single": round(per_single, 1),
        "recall_at_k": round(recall_at_k(found, ctx.truth), 4),
    }


def _row(ctx: Context, system: str, series: str, setting: str, **fields: Any) -> dict:
    return {"n": ctx.n, "system": system, "series": series, "setting": setting, **fields}


def _build_fields(built: Built, model_bytes: float | None, n: int) -> dict[str, Any]:
    return {
        "status": "ok",
        "build_s": round(built.train_s + built.add_s, 2),
        "train_s": round(built.train_s, 2),
        "add_s": round(built.add_s, 2),
        "generate_s": round(built.generate_s, 2),
        "reused": built.reused,
        "rss_delta_bytes": int(built.rss_delta),
        "model_bytes": None if model_bytes is None else int(model_bytes),
        "model_bytes_per_vector": None if model_bytes is None else round(model_bytes / n, 1),
    }


def run_flat(args: argparse.Namespace, ctx: Context) -> list[dict]:
    """Exact inner-product search (IndexFlatIP)."""
    model = 4.0 * ctx.sset.dim * ctx.n
    if reason := too_big(model):
        return [_row(ctx, "flat", "Flat", "exact", status=f"skipped: {reason}")]
    built = build_faiss(ctx, "Flat", _noop, 0, keep=False)  # adding is all it takes
    row = _row(ctx, "flat", "Flat", "exact", **_build_fields(built, model, ctx.n))
    return [{**row, **measure(faiss_search(built.index, None, ctx.k), ctx)}]


def _noop(index: Any) -> None:
    """No settings to change."""


def run_hnsw(args: argparse.Namespace, ctx: Context) -> list[dict]:
    """HNSW graphs (each M x efConstruction x storage), each searched at every efSearch."""
    rows, dim = [], ctx.sset.dim
    for m in args.hnsw_m:
        for efc in args.ef_construction:
            for storage in args.hnsw_storage:
                factory = f"HNSW{m}" if storage == "Flat" else f"HNSW{m},{storage}"
                code = {"Flat": 4 * dim, "SQfp16": 2 * dim, "SQ8": dim}[storage]
                model = hnsw_bytes_per_vector(dim, m, code) * ctx.n
                series = f"HNSW{m} {storage} efC={efc}"
                if reason := too_big(model):
                    rows.append(_row(ctx, "hnsw", series, "-", status=f"skipped: {reason}"))
                    continue
                built = build_faiss(ctx, factory, EfConstruction(efc), args.train_size or 100_000)
                fields = _build_fields(built, model, ctx.n)
                for ef in args.ef_search:
                    found = measure(faiss_search(built.index, f"efSearch={ef}", ctx.k), ctx)
                    rows.append(_row(ctx, "hnsw", series, f"efSearch={ef}", **fields, **found))
                del built
    return rows


def nlist_for(n: int) -> int:
    """The default number of IVF lists: 4 sqrt(n) rounded to a power of two, at most n / 39."""
    return int(min(2 ** round(np.log2(4 * np.sqrt(n))), 2 ** int(np.log2(max(n // 39, 1)))))


def run_ivfpq(args: argparse.Namespace, ctx: Context) -> list[dict]:
    """IVF-PQ (each nlist x m), searched at every nprobe, its candidates re-ranked from the
    store at every depth (0: not re-ranked)."""
    rows, dim = [], ctx.sset.dim
    for nlist in args.nlist or [nlist_for(ctx.n)]:
        hnsw_q = args.ivf_quantizer == "hnsw" or (args.ivf_quantizer == "auto" and nlist >= 8192)
        for m in args.pq_m:
            codec = f"PQ{m}" + ("x4fs" if args.pq_nbits == 4 else "")
            factory = f"IVF{nlist}{'_HNSW32' if hnsw_q else ''},{codec}"
            model = ivfpq_bytes(ctx.n, dim, nlist, m, args.pq_nbits, hnsw_q)
            if reason := too_big(model):
                rows.append(_row(ctx, "ivfpq-rerank", factory, "-", status=f"skipped: {reason}"))
                continue
            train = args.train_size or min(ctx.n, max(50_000, 30 * nlist))
            built = build_faiss(ctx, factory, IvfSettings(args.kmeans_iters), train)
            fields = _build_fields(built, model, ctx.n)
            fields["rerank_store_bytes_per_vector"] = np.dtype(args.rerank_dtype).itemsize * dim
            for nprobe in args.nprobe:
                params = f"nprobe={nprobe}" + (
                    f",quantizer_efSearch={2 * nprobe}" if hnsw_q else ""
                )
                for depth in args.rerank:
                    search = _ivf_search(built.index, params, depth, ctx)
                    setting = f"nprobe={nprobe} rerank={depth}"
                    series = f"{factory} rerank={depth}"
                    extra = {"nprobe": nprobe, "rerank_depth": depth}
                    if depth:
                        extra["rerank_dtype"] = args.rerank_dtype
                    found = measure(search, ctx)
                    rows.append(
                        _row(ctx, "ivfpq-rerank", series, setting, **fields, **extra, **found)
                    )
            del built
    return rows


def _ivf_search(index: Any, params: str, depth: int, ctx: Context) -> Search:
    if not depth:
        return faiss_search(index, params, ctx.k)
    candidates = faiss_search(index, params, depth)
    return lambda q: rerank(ctx.store, q, candidates(q), ctx.k)


def write_shards(sset: SyntheticSet, n: int, directory: Path) -> list[Path]:
    """The set as fp32 embedding shards (one per block, ids = row numbers), for backends that
    build from shards; chunks already written are kept."""
    meta = EmbeddingMeta(model=f"synthetic:{sset.real.model}", dim=sset.dim, fingerprint=sset.key)
    dirs = []
    for b in tqdm(range(-(-n // sset.block)), desc="write shards", unit="chunk"):
        d = directory / f"chunk-{b:05d}"
        if not (d / "meta.json").exists():
            start, x = sset.block_rows(b, n)
            write_embeddings(d, [str(i) for i in range(start, start + len(x))], x, meta)
        dirs.append(d)
    return dirs


def run_milvus(args: argparse.Namespace, ctx: Context) -> list[dict]:
    """The Milvus backend (`retrieval.milvus_index.MilvusIndex`), built from shards of the set."""
    series = f"Milvus {args.milvus_index}"
    try:
        cls = importlib.import_module("chatretriever.retrieval.milvus_index").MilvusIndex
    except (ImportError, AttributeError) as e:
        why = f"skipped: chatretriever.retrieval.milvus_index.MilvusIndex unavailable ({e})"
        return [_row(ctx, "milvus", series, "-", status=why)]
    cache = Path(args.out) / "cache"
    uri = args.milvus_uri or str(cache / "milvus.db")
    # Milvus Lite, on this machine, holds the float32 vectors in memory.
    if uri.endswith(".db") and (reason := too_big(4.0 * ctx.sset.dim * ctx.n)):
        return [_row(ctx, "milvus", series, "-", status=f"skipped: {reason}")]
    shards = write_shards(ctx.sset, ctx.n, cache / f"shards-{ctx.sset.key}-n{ctx.n}")
    # The index spec's keyword: `index_spec` ("HNSW:M=32,...") in milvus_index.py, or
    # `index_type` in an older draft of it.
    kind = "index_spec" if "index_spec" in inspect.signature(cls.build).parameters else "index_type"
    rss0, start = rss_bytes(), time.perf_counter()
    try:
        index = cls.build(
            shards,
            uri=uri,
            collection=f"index_scale_{ctx.sset.key}_n{ctx.n}",
            show_progress=True,
            **{kind: args.milvus_index},
        )
    except MissingExtraError as e:
        return [_row(ctx, "milvus", series, "-", status=f"skipped: {e}")]
    except Exception as e:  # a backend error should not lose the Faiss rows measured so far
        traceback.print_exc()
        return [_row(ctx, "milvus", series, "-", status=f"failed: {type(e).__name__}: {e}")]
    built = Built(index, 0.0, time.perf_counter() - start, 0.0, rss_bytes() - rss0, False)
    fields = _build_fields(built, getattr(index, "memory_bytes", None), ctx.n)
    rows = []
    for params in args.milvus_params or [None]:
        found = measure(_milvus_search(index, params, ctx.k), ctx)
        rows.append(_row(ctx, "milvus", series, params or "default", **fields, **found))
    if hasattr(index, "close"):
        index.close()
    return rows


def _milvus_search(index: Any, params: str | None, k: int) -> Search:
    def search(q: np.ndarray) -> np.ndarray:
        out = np.full((len(q), k), -1, dtype=np.int64)
        for i, hits in enumerate(index.search(q, k, params)):
            out[i, : len(hits)] = [int(pid) for pid, _ in hits[:k]]
        return out

    return search


RUNNERS = {"flat": run_flat, "hnsw": run_hnsw, "ivfpq-rerank": run_ivfpq, "milvus": run_milvus}
