"""A Faiss inner-product index over embedding shards, with its id map and encoder metadata.

Exact search (`IndexFlatIP`) by default; any Faiss factory string otherwise ("HNSW32",
"IVF1024,PQ64", ...), trained on a sample of the vectors when the index type needs it. Saved as a
directory (`index.faiss`, `ids.txt`, `meta.json`) that is renamed into place when complete.
`load_index` opens any backend's directory: this Faiss one, or a Milvus collection's descriptor
(`milvus_index.MilvusIndex`), as meta.json's "backend" says. Reading the shards and checking the
query encoder are in `index_inputs` (shared with Milvus). Torch-free.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from chatretriever.errors import DataFormatError, require_extra
from chatretriever.io.atomic import atomic_dir
from chatretriever.io.embeddings import EmbeddingMeta
from chatretriever.retrieval.encoders import fingerprint_of
from chatretriever.retrieval.index_inputs import (
    EncoderMismatchError,  # noqa: F401  re-exported: users catch it as index.EncoderMismatchError
    check_query_encoder,
    duplicate_id_message,
    read_shards,
)
from chatretriever.retrieval.ties import TIE_LIMIT, TIE_MARGIN, top_k_with_ties  # noqa: F401
from chatretriever.types import batch

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.txt"
META_FILE = "meta.json"
DEFAULT_FACTORY = "Flat"
BACKENDS = ("faiss", "milvus")  # meta.json "backend"; none recorded: faiss (older indexes)
ADD_BLOCK = 20_000  # vectors per `index.add` call: the progress bar moves per block


class VectorIndex(Protocol):
    """What searching needs of an index, whatever holds the vectors (`DenseIndex`, `MilvusIndex`).

    Attributes:
        ids: Passage ids in the order the shards listed them.
        meta: Metadata of the encoder that produced the vectors.
        factory: How the vectors are indexed ("Flat", "HNSW32", "milvus:FLAT", ...).
    """

    ids: list[str]
    meta: EmbeddingMeta
    factory: str

    def __len__(self) -> int: ...

    def check_encoder(
        self, name: str, dim: int, normalized: bool, fingerprint: str | None = None
    ) -> None: ...

    def search(
        self, queries: np.ndarray, k: int = 100, params: str | None = None
    ) -> list[list[tuple[str, float]]]: ...

    @property
    def memory_bytes(self) -> int: ...

    def save(self, directory: str | Path, settings: dict[str, Any] | None = None) -> Path: ...


def _faiss():
    return require_extra("faiss", "faiss", "the index")


def faiss_message(error: Exception) -> str:
    """The reason in a Faiss exception, without its C++ location."""
    text = " ".join(str(error).split())
    match = re.search(r"\.(?:cpp|h):\d+: (.*)", text)
    return (match.group(1) if match else text).strip()


def check_factory(factory: str, dim: int, n_vectors: int | None = None) -> None:
    """Refuse, before any encoding, a Faiss factory string Faiss cannot parse, or one whose
    training needs more vectors than the corpus has (an IVF of more lists than vectors)."""
    faiss = _faiss()
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"Faiss factory {factory!r}: {faiss_message(e)}") from None
    if index.is_trained or n_vectors is None:
        return
    try:
        lists = faiss.extract_index_ivf(index).nlist
    except RuntimeError:  # not an IVF: PQ and others check their training set when built
        return
    if n_vectors < lists:
        raise ValueError(
            f"Faiss factory {factory!r} trains {lists} lists, more than the corpus's {n_vectors} "
            "vectors: give fewer lists (IVF<n>, n <= vectors / 39 is Faiss's advice) or Flat"
        )


def add_vectors(index: Any, emb: np.ndarray, bar: Any = None) -> None:
    """Add (N, D) vectors to a Faiss index in blocks of `ADD_BLOCK`, updating a tqdm bar."""
    for start in range(0, len(emb), ADD_BLOCK):
        block = np.ascontiguousarray(emb[start : start + ADD_BLOCK], dtype=np.float32)  # (b, D)
        index.add(block)
        if bar is not None:
            bar.update(len(block))


class DenseIndex:
    """Maximum inner-product search over passage embeddings.

    Args:
        index: A Faiss index using the inner-product metric.
        ids: Passage id of each row, in the order vectors were added.
        meta: Metadata of the encoder that produced the vectors.
        factory: The Faiss factory string the index was built from.
    """

    def __init__(self, index: Any, ids: list[str], meta: EmbeddingMeta, factory: str) -> None:
        if index.ntotal != len(ids):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(ids)} ids")
        self.index = index
        self.ids = ids
        self.meta = meta
        self.factory = factory
        self._warned_by_name = False

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(
        cls,
        shard_dirs: Sequence[str | Path],
        factory: str = DEFAULT_FACTORY,
        train_size: int = 100_000,
        seed: int = 0,
        show_progress: bool = False,
    ) -> DenseIndex:
        """Build an index from embedding shard directories (see `encode.list_shards`).

        Args:
            shard_dirs: Shard directories, added in this order.
            factory: Faiss factory string; "Flat" is exact inner-product search.
            train_size: Vectors sampled (without replacement, seeded) to train IVF/PQ indexes.
            seed: Seed of that sample.
            show_progress: A progress bar over the vectors added (graph indexes such as HNSW
                take minutes per million vectors).

        Returns:
            The built index; all shards must come from one encoder.
        """
        _faiss()  # a clear error when the extra is missing
        ids, arrays, meta = read_shards(shard_dirs)
        return cls._from_arrays(ids, arrays, meta, factory, train_size, seed, show_progress)

    @classmethod
    def from_vectors(
        cls,
        ids: Sequence[str],
        vectors: np.ndarray,
        encoder: Any,
        factory: str = DEFAULT_FACTORY,
        train_size: int = 100_000,
        seed: int = 0,
    ) -> DenseIndex:
        """Build an index from vectors in memory (no shards on disk).

        Args:
            ids: Passage ids, one per row (distinct, no whitespace: they go into run files).
            vectors: (N, D) passage embeddings made by `encoder`.
            encoder: The encoder that made them (its name, dim, normalize and fingerprint are
                recorded: queries of another encoder are refused, as for a built index).
            factory, train_size, seed: As for `build`.

        Raises:
            ValueError: Ids and rows differ in number, an id repeats or is not a TREC id, or
                the vectors are not (N, encoder.dim).
        """
        _faiss()
        ids = [str(i) for i in batch(ids, "ids", "ids")]
        bad = next((n for n, i in enumerate(ids) if not i or re.search(r"\s", i)), None)
        if bad is not None:
            raise ValueError(
                f"ids[{bad}] {ids[bad]!r}: ids go into run files (none empty, no space)"
            )
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, D)
        if vectors.ndim != 2 or vectors.shape != (len(ids), int(encoder.dim)):
            raise ValueError(
                f"vectors have shape {vectors.shape}, expected ({len(ids)}, {encoder.dim}): "
                "one row of the encoder's size per id"
            )
        if len(set(ids)) != len(ids):
            raise ValueError(duplicate_id_message(["ids"], [ids]))
        meta = EmbeddingMeta(
            model=encoder.name,
            dim=int(encoder.dim),
            normalized=bool(encoder.normalize),
            count=len(ids),
            fingerprint=fingerprint_of(encoder),
        )
        return cls._from_arrays(ids, [vectors], meta, factory, train_size, seed, False)

    @classmethod
    def _from_arrays(
        cls,
        ids: list[str],
        arrays: list[np.ndarray],
        meta: EmbeddingMeta,
        factory: str,
        train_size: int,
        seed: int,
        show_progress: bool,
    ) -> DenseIndex:
        faiss = _faiss()
        try:
            index = faiss.index_factory(meta.dim, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"Faiss factory {factory!r}: {faiss_message(e)}") from None
        if not index.is_trained:
            sample = _sample_rows(arrays, train_size, seed)
            logger.info("training %s on %d vectors", factory, len(sample))
            try:
                index.train(sample)
            except RuntimeError as e:
                msg = f"Faiss factory {factory!r} cannot be trained on {len(sample)} vectors"
                raise ValueError(f"{msg}: {faiss_message(e)}") from None
        desc = f"index {factory}"
        with tqdm(total=len(ids), desc=desc, unit="vec", disable=not show_progress) as bar:
            for emb in arrays:
                add_vectors(index, emb, bar)
        return cls(index, ids, meta, factory)

    def check_encoder(
        self, name: str, dim: int, normalized: bool, fingerprint: str | None = None
    ) -> None:
        """Raise EncoderMismatchError unless queries from this encoder fit the index.

        Args:
            name: The query encoder's name.
            dim: Its embedding size.
            normalized: Whether its vectors are L2-normalised.
            fingerprint: Its `Encoder.fingerprint` (`encoders.fingerprint_of`). When the index or
                the encoder has none (an index built before fingerprints existed), names are
                compared instead, with a warning.
        """
        warned = check_query_encoder(
            self.meta, name, dim, normalized, fingerprint, warn=not self._warned_by_name
        )
        self._warned_by_name = self._warned_by_name or warned  # warn once per loaded index

    def search(
        self, queries: np.ndarray, k: int = 100, params: str | None = None
    ) -> list[list[tuple[str, float]]]:
        """Top-k passages per query.

        Args:
            queries: (Q, D) query embeddings.
            k: Passages per query (fewer when the index holds fewer).
            params: Faiss search parameters, e.g. "efSearch=128" or "nprobe=16".

        Returns:
            For each query, (passage id, score) pairs, best first.
        """
        _faiss()  # a clear error when the extra is missing
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer of at least 1, got {k!r}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, D)
        if queries.ndim != 2 or queries.shape[1] != self.meta.dim:
            raise ValueError(f"queries have shape {queries.shape}, index dim is {self.meta.dim}")
        self.set_search_params(params)

        def search_at(depth: int, which: list[int]) -> list[list[tuple[str, float]]]:
            scores, rows = self.index.search(queries[which], depth)  # (len(which), depth) each
            return [
                [(self.ids[r], float(s)) for s, r in zip(srow, rrow, strict=True) if r >= 0]
                for srow, rrow in zip(scores, rows, strict=True)
            ]

        if not self.ids:
            return [[] for _ in queries]
        return top_k_with_ties(search_at, k, len(self.ids), len(queries))

    def set_search_params(self, params: str | None) -> None:
        """Apply Faiss search parameters ("efSearch=128", "nprobe=16", comma-separated).

        Raises:
            ValueError: malformed text, or a parameter this kind of index does not have.
        """
        if not params:
            return
        for item in params.split(","):
            name, eq, value = item.partition("=")
            try:
                float(value)
            except ValueError:
                eq = ""
            if not eq or not name.strip():
                raise ValueError(
                    f"search parameters {params!r}: expected name=number[,name=number], "
                    f"e.g. efSearch=128 (HNSW) or nprobe=16 (IVF)"
                )
        try:
            _faiss().ParameterSpace().set_index_parameters(self.index, params)
        except RuntimeError as e:
            raise ValueError(
                f"search parameters {params!r} do not apply to a {self.factory} index "
                f"({faiss_message(e)})"
            ) from None

    @property
    def memory_bytes(self) -> int:
        """Approximate memory held by the index and its id map, in bytes."""
        faiss = _faiss()
        inner = faiss.downcast_index(self.index)
        if isinstance(inner, faiss.IndexFlat):
            size = inner.ntotal * inner.code_size
        else:  # no generic size method in Faiss: the serialised size is close to it
            size = int(faiss.serialize_index(self.index).nbytes)
        return int(size + sum(len(i) + 49 for i in self.ids))  # 49: a small str object

    def save(self, directory: str | Path, settings: dict[str, Any] | None = None) -> Path:
        """Write the index, its id map and metadata to a directory, atomically."""
        faiss = _faiss()
        directory = Path(directory)
        with atomic_dir(directory) as tmp:
            faiss.write_index(self.index, str(tmp / INDEX_FILE))
            (tmp / IDS_FILE).write_text("".join(f"{i}\n" for i in self.ids), encoding="utf-8")
            info = {
                "backend": "faiss",
                "embedding": asdict(self.meta),
                "factory": self.factory,
                "ntotal": len(self.ids),
                "memory_bytes": self.memory_bytes,
                "settings": settings or {},
            }
            (tmp / META_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> DenseIndex:
        """Load an index saved by `save`; checks that ids and vectors agree."""
        faiss = _faiss()
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.exists():
            raise DataFormatError(meta_path, "file not found (not an index directory?)")
        try:
            info = json.loads(meta_path.read_text(encoding="utf-8"))
            meta = EmbeddingMeta(**info["embedding"])
            factory = info["factory"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataFormatError(meta_path, f"bad index metadata: {e}") from None
        if info.get("backend", "faiss") != "faiss":
            msg = f"a {info['backend']} index, not a Faiss one: open it with `load_index`"
            raise DataFormatError(meta_path, msg, field="backend")
        ids = (directory / IDS_FILE).read_text(encoding="utf-8").splitlines()
        index = faiss.read_index(str(directory / INDEX_FILE))
        if index.ntotal != len(ids):
            raise DataFormatError(
                directory / IDS_FILE, f"{len(ids)} ids but the index holds {index.ntotal} vectors"
            )
        return cls(index, ids, meta, factory)


def backend_of(directory: str | Path) -> str:
    """The backend an index directory was saved by (meta.json "backend"; none: "faiss")."""
    meta_path = Path(directory) / META_FILE
    if not meta_path.exists():
        raise DataFormatError(meta_path, "file not found (not an index directory?)")
    try:
        info = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(meta_path, f"bad index metadata: {e}") from None
    backend = info.get("backend", "faiss") if isinstance(info, dict) else None
    if backend not in BACKENDS:
        msg = f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})"
        raise DataFormatError(meta_path, msg, field="backend")
    return backend


def load_index(directory: str | Path) -> VectorIndex:
    """Load an index directory of any backend: a `DenseIndex` (Faiss) or a `MilvusIndex`."""
    if backend_of(directory) == "milvus":
        from chatretriever.retrieval.milvus_index import MilvusIndex

        return MilvusIndex.load(directory)
    return DenseIndex.load(directory)


def _sample_rows(arrays: list[np.ndarray], size: int, seed: int) -> np.ndarray:
    """A seeded sample of rows drawn across several (N_i, D) arrays; returns (S, D) float32."""
    sizes = [len(a) for a in arrays]
    total = sum(sizes)
    rows = np.sort(np.random.default_rng(seed).permutation(total)[: min(size, total)])
    offsets = np.cumsum([0, *sizes])
    parts = []
    for a, lo, hi in zip(arrays, offsets[:-1], offsets[1:], strict=True):
        mine = rows[(rows >= lo) & (rows < hi)] - lo
        if len(mine):
            parts.append(np.asarray(a[mine], dtype=np.float32))
    return np.ascontiguousarray(np.concatenate(parts))
