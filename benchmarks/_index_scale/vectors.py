"""The vectors: real passage embeddings, the synthetic set made from them, the exact search.

A synthetic set is streamed block by block (block b depends on (seed, b) only), so the first rows
of a larger set are the smaller set; `ground_truth` scans it exactly (blocked, fp32) and can write
the re-ranking store on the way; `structure` measures how much real neighbourhood it keeps.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from chatretriever.io.atomic import atomic_path
from chatretriever.io.embeddings import read_embeddings
from chatretriever.retrieval.encode import list_shards

PROBES = 200  # base vectors whose neighbours measure the structure kept
HOW_TO_ENCODE = (
    "make them with `chatretriever encode ../shared/data/mtrag/corpus.jsonl.gz "
    "--model chatretriever-smol --out outputs/benchmark/emb/chatretriever-smol` (resumable; "
    "about 650 passages/s on an H100, hours on a CPU) or pass --emb DIR"
)


@dataclass(frozen=True)
class RealVectors:
    """Real passage embeddings split into base passages (P, D) and held-out ones (Q, D)."""

    base: np.ndarray
    held_out: np.ndarray
    model: str
    fingerprint: str | None


def find_embeddings(path: str) -> list[Path]:
    """The shard dirs of `--emb`: an `encode_corpus` output, or a folder holding exactly one."""
    root = Path(path)
    if not root.is_dir():
        raise SystemExit(f"no real embeddings at {root}: {HOW_TO_ENCODE}")
    try:
        return list_shards([root])
    except ValueError as e:
        subs = [d for d in sorted(root.iterdir()) if d.is_dir() and any(d.glob("chunk-*"))]
        if len(subs) != 1:
            found = f"several embedding sets ({', '.join(d.name for d in subs)})" if subs else e
            raise SystemExit(f"{root}: {found}; {HOW_TO_ENCODE}") from None
        try:
            return list_shards(subs)
        except ValueError as e2:
            raise SystemExit(f"{subs[0]}: {e2}") from None


def load_real(emb: str, n_queries: int, seed: int) -> RealVectors:
    """Real embeddings, L2-normalised, with `n_queries` of them held out (seeded)."""
    shards = [read_embeddings(d) for d in find_embeddings(emb)]
    vectors = np.concatenate([np.asarray(e, dtype=np.float32) for _, e, _ in shards])  # (N, D)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    if len(vectors) <= n_queries:
        raise SystemExit(f"{emb}: {len(vectors)} vectors, not more than --queries {n_queries}")
    rows = np.random.default_rng(seed).permutation(len(vectors))
    meta = shards[0][2]
    base, held = vectors[np.sort(rows[n_queries:])], vectors[rows[:n_queries]]
    return RealVectors(base, held, meta.model, meta.fingerprint)


def nn_distance(base: np.ndarray, sample: int = 2000, seed: int = 0) -> float:
    """Median Euclidean distance from a base passage (a sample) to its nearest other one."""
    rows = np.random.default_rng(seed).choice(len(base), min(sample, len(base)), replace=False)
    scores = base[rows] @ base.T  # (S, P)
    scores[np.arange(len(rows)), rows] = -np.inf
    return float(np.median(np.sqrt(np.maximum(2.0 - 2.0 * scores.max(axis=1), 0.0))))


@dataclass(frozen=True)
class SyntheticSet:
    """Base vectors streamed in blocks, and the queries, made from real vectors plus noise.

    Noise is `factor * z @ basis` with z ~ N(0, I) (`basis` None: isotropic), so that its
    expected norm is `noise_norm`. `key` names the caches: it hashes everything that fixes
    the vectors.
    """

    real: RealVectors
    basis: np.ndarray | None  # (D, D)
    factor: float
    noise_norm: float
    seed: int
    block: int
    key: str

    @property
    def dim(self) -> int:
        return self.real.base.shape[1]

    def _noisy(self, sources: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        z = rng.standard_normal(sources.shape, dtype=np.float32)  # (B, D)
        if self.basis is not None:
            z = z @ self.basis
        x = sources + self.factor * z
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def generators(self, rows: np.ndarray) -> np.ndarray:
        """The base passage each row copies."""
        return rows % len(self.real.base)

    def block_rows(self, b: int, n: int) -> tuple[int, np.ndarray]:
        """(first row, (B, D) float32 vectors) of block b of an n-vector set."""
        start = b * self.block
        rows = np.arange(start, min(n, start + self.block))
        rng = np.random.default_rng([self.seed, 0, b])
        return start, self._noisy(self.real.base[self.generators(rows)], rng)

    def blocks(self, n: int, desc: str | None) -> Iterator[tuple[int, np.ndarray]]:
        """Every block of an n-vector set, in order, with a progress bar (desc None: none)."""
        with tqdm(total=n, desc=desc, unit="vec", unit_scale=True, disable=desc is None) as bar:
            for b in range(-(-n // self.block)):
                start, x = self.block_rows(b, n)
                yield start, x
                bar.update(len(x))

    def head(self, count: int) -> np.ndarray:
        """The first `count` rows, (count, D)."""
        return np.concatenate([x for _, x in self.blocks(count, f"first {count:,} vectors")])

    def queries(self) -> np.ndarray:
        """(Q, D) held-out passages plus noise."""
        return self._noisy(self.real.held_out, np.random.default_rng([self.seed, 1]))


def make_set(real: RealVectors, noise: float, shape: str, seed: int, block: int) -> SyntheticSet:
    """The synthetic set: noise of norm `noise` x the median nearest-neighbour distance."""
    base = real.base
    norm = noise * nn_distance(base, seed=seed)
    if shape == "covariance":
        w, v = np.linalg.eigh(np.cov(base.T.astype(np.float64)))  # C = V diag(w) V^T
        w = np.maximum(w, 0.0)
        basis = (np.sqrt(w)[:, None] * v.T).astype(np.float32)  # cov(z @ basis) = C
        factor = norm / float(np.sqrt(w.sum()))
    else:
        basis, factor = None, norm / float(np.sqrt(base.shape[1]))
    settings = {
        "model": real.model,
        "fingerprint": real.fingerprint,
        "passages": len(base) + len(real.held_out),
        "queries": len(real.held_out),
        "noise": noise,
        "shape": shape,
        "seed": seed,
        "block": block,
    }
    key = settings_hash(settings)
    return SyntheticSet(real, basis, float(factor), float(norm), seed, block, key)


def settings_hash(obj: Any) -> str:
    """A short key of JSON-able settings: names the caches built from them."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class GroundTruth:
    """Exact top k of the queries (Q, k) and of probe base vectors (S, k + 1, self included)."""

    top: np.ndarray
    probe_rows: np.ndarray
    probe_top: np.ndarray
    probe_cosine: float  # mean cosine of a probe vector to its generator passage
    seconds: float


def _top(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (score, row) of each line, best first (ties: lower row)."""
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores, rows = np.take_along_axis(scores, part, 1), np.take_along_axis(rows, part, 1)
    order = np.lexsort((rows, -scores), axis=-1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def exact_scan(
    sset: SyntheticSet, n: int, targets: np.ndarray, k: int, store: np.ndarray | None
) -> np.ndarray:
    """(T, k) rows of the exact top k of each target over the first n vectors, by a blocked
    scan; writes each block into `store` on the way when given."""
    best_s = np.full((len(targets), k), -np.inf, dtype=np.float32)
    best_r = np.full((len(targets), k), -1, dtype=np.int64)
    for start, x in sset.blocks(n, f"exact top {k}"):
        if store is not None:
            store[start : start + len(x)] = x
        scores = targets @ x.T  # (T, B)
        rows = np.broadcast_to(np.arange(start, start + len(x)), scores.shape)
        s, r = _top(scores, rows, k)  # (T, k) each
        best_s, best_r = _top(np.hstack([best_s, s]), np.hstack([best_r, r]), k)
    return best_r


def ground_truth(
    sset: SyntheticSet, n: int, k: int, cache: Path, store_path: Path | None, dtype: str
) -> GroundTruth:
    """Exact top k of the queries and probes (cached), writing the re-ranking store if asked."""
    path = cache / f"exact-{sset.key}-n{n}-k{k}.npz"
    if path.exists() and (store_path is None or store_path.exists()):
        z = np.load(path)
        args = (z["top"], z["probe_rows"], z["probe_top"], float(z["cosine"]), float(z["seconds"]))
        return GroundTruth(*args)
    head = sset.head(min(n, sset.block))
    probe_rows = np.sort(np.random.default_rng(sset.seed).choice(len(head), min(PROBES, n), False))
    probes = head[probe_rows]  # (S, D)
    cosine = float(np.mean(np.sum(probes * sset.real.base[sset.generators(probe_rows)], axis=1)))
    targets = np.vstack([sset.queries(), probes])  # (Q + S, D)
    start = time.perf_counter()
    if store_path is None or store_path.exists():
        top = exact_scan(sset, n, targets, k + 1, None)
    else:
        with atomic_path(store_path) as tmp:
            store = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, sset.dim))
            top = exact_scan(sset, n, targets, k + 1, store)
            store.flush()
            del store
    seconds = time.perf_counter() - start
    q = len(sset.real.held_out)
    truth = GroundTruth(top[:q, :k], probe_rows, top[q:], cosine, seconds)
    with atomic_path(path) as tmp:
        np.savez(tmp, top=truth.top, probe_rows=probe_rows, probe_top=truth.probe_top,
                 cosine=cosine, seconds=seconds)  # fmt: skip
    return truth


def structure(sset: SyntheticSet, n: int, truth: GroundTruth) -> dict[str, float]:
    """How much of the real neighbourhood structure the synthetic set keeps (see the top)."""
    k = truth.top.shape[1]
    real = sset.real
    real_top = np.argpartition(-(real.held_out @ real.base.T), k - 1, axis=1)[:, :k]  # (Q, k)
    found = sset.generators(truth.top)  # (Q, k) passages of the exact top k
    real_rate = np.mean([np.isin(f, t).mean() for f, t in zip(found, real_top, strict=True)])
    others = [r[r != p][:k] for r, p in zip(truth.probe_top, truth.probe_rows, strict=True)]
    own = sset.generators(truth.probe_rows)
    copy_rate = np.mean(
        [np.mean(sset.generators(o) == g) for o, g in zip(others, own, strict=True)]
    )
    copies = n // len(real.base) + (own < n % len(real.base))  # (S,) copies of each one's passage
    return {
        "base_passages": len(real.base),
        "copies_per_passage": round(n / len(real.base), 2),
        "noise_norm": round(sset.noise_norm, 4),
        "cosine_to_generator": round(truth.probe_cosine, 4),
        "copy_rate": round(float(copy_rate), 4),
        "copy_rate_max": round(float(np.mean(np.minimum(k, copies - 1) / k)), 4),
        "real_neighbour_rate": round(float(real_rate), 4),
    }
