"""A Milvus collection behind the index interface of `index.DenseIndex` (build, search, save, load).

The vectors live in a Milvus collection (passage id: VARCHAR primary key, vector: FLOAT_VECTOR,
inner-product metric); the index directory is a small descriptor that names it:

    DIR/meta.json    "backend": "milvus", the URI, the collection, the encoder metadata (with its
                     fingerprint), the index type and the caller's settings; written last
    DIR/ids.txt      passage ids in shard order (what `CorpusIndex` checks its passages against)

The URI is a local milvus-lite `.db` file, stored relative to the descriptor so that the
directory moves with its database, or a Milvus server (`milvus_uri`). The index spec and the
state a build records are plain values (`milvus_spec`), the collection writes `milvus_build`;
this module holds the search and the descriptor.

The collection records the encoder (model, dim, normalisation, fingerprint) and a digest of the
passage ids in its properties: `load` refuses a collection whose encoder differs from the
descriptor's, `search` callers refuse queries of another encoder (`check_encoder`), and a build
into a collection that holds another model or corpus is refused unless `overwrite` drops it.

Loading resumes: rows are upserted shard by shard in batches, and after each shard the number of
leading rows (in id order) that are in is recorded in the collection. A re-run of an interrupted
build skips those rows and upserts, of the others, only the ids the collection does not hold yet
(looked up batch by batch; an id present holds the same vector: the encoder, the corpus and the
vectors digest are checked before anything is written).

A collection built before the vectors digest existed records none: a build into it upserts every
row again and then records the digest (`milvus_build.open_for_build`), and loading an index whose
collection or descriptor lacks one warns that its vectors were not checked.

Torch-free; `pymilvus` (and `milvus-lite` for local files) are imported when used.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from chatretriever.errors import DataFormatError
from chatretriever.io.atomic import atomic_files
from chatretriever.io.embeddings import EmbeddingMeta
from chatretriever.retrieval.index import IDS_FILE, INDEX_FILE, META_FILE
from chatretriever.retrieval.index_inputs import check_query_encoder, read_shards
from chatretriever.retrieval.milvus_build import (
    DEFAULT_BATCH,
    ID_FIELD,
    VECTOR_FIELD,
    count_rows,
    open_for_build,
    record_state,
    recorded_state,
    upsert_shards,
)
from chatretriever.retrieval.milvus_spec import (
    DEFAULT_INDEX,
    build_state,
    check_finished,
    check_ids,
    check_search_params,
    parse_index_spec,
    spec_text,
)
from chatretriever.retrieval.milvus_uri import (
    connect,
    is_local,
    milvus_errors,
    resolve_uri,
    stored_uri,
)
from chatretriever.retrieval.ties import top_k_with_ties
from chatretriever.types import rank_key

logger = logging.getLogger(__name__)

BACKEND = "milvus"
MAX_TOPK = 16_384  # Milvus's limit on hits per query
DEFAULT_EF = 64  # HNSW's ef when none is given (milvus-lite's default), raised to k when below
SEARCH_BLOCK = 256  # queries per search call: bounded gRPC messages


def _warn_unchecked_vectors(directory: Path, collection: str, old_descriptor: bool) -> None:
    """Say that an index from before vector digests cannot tell whether its collection still
    holds the vectors it was built with (a rebuild since, with edited passages, goes unseen)."""
    which = f"the index {directory}" if old_descriptor else f"the Milvus collection {collection!r}"
    logger.warning(
        "%s was built before chatretriever recorded a digest of its vectors: whether the "
        "collection %r still holds the vectors this index was built with is not checked; build "
        "the index again into it (`chatretriever index`: an old collection is refreshed once) to "
        "record one",
        which,
        collection,
    )


class MilvusIndex:
    """Maximum inner-product search over passage embeddings held in a Milvus collection.

    Args:
        client: A connected `pymilvus.MilvusClient` (`connect`).
        uri: The URI it was connected with (a local `.db` path, or a server URI).
        collection: The collection that holds the vectors.
        ids: Passage ids in shard order.
        meta: Metadata of the encoder that produced the vectors.
        factory: "milvus:" + the index spec ("milvus:FLAT", "milvus:HNSW:M=16").
    """

    def __init__(
        self,
        client: Any,
        uri: str,
        collection: str,
        ids: list[str],
        meta: EmbeddingMeta,
        factory: str,
    ) -> None:
        self.client = client
        self.uri = uri
        self.collection = collection
        self.ids = ids
        self.meta = meta
        self.factory = factory
        self.upserted = 0  # rows the last `build` wrote (fewer than len(ids) when it resumed)
        self.vectors_sha256: str | None = None  # what `build` upserted (`vectors_digest`)
        self.directory: Path | None = None  # the descriptor's directory, once saved or loaded
        # the index type, as recorded (not checked again: a descriptor of an older version loads)
        self.kind = factory.removeprefix(f"{BACKEND}:").partition(":")[0].upper()
        self._search_params: dict[str, Any] = {}
        self._warned_by_name = False
        self._told_ef = False  # logged once that an ef below k was raised

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(
        cls,
        shard_dirs: Sequence[str | Path],
        uri: str,
        collection: str,
        index_spec: str = DEFAULT_INDEX,
        batch_size: int = DEFAULT_BATCH,
        show_progress: bool = False,
        overwrite: bool = False,
    ) -> MilvusIndex:
        """Upsert embedding shards (see `encode.list_shards`) into a collection; resumes.

        Args:
            shard_dirs: Shard directories, loaded in this order.
            uri: A local `.db` file (milvus-lite) or a Milvus server URI.
            collection: The collection; created when missing, resumed when it holds an
                unfinished (or finished) build of the same shards and encoder.
            index_spec: See `parse_index_spec` ("FLAT" is exact search).
            batch_size: Rows per upsert call.
            show_progress: A progress bar over the vectors.
            overwrite: Drop an existing collection first (another model or corpus is refused
                otherwise).

        Returns:
            The index; `upserted` counts the rows this call wrote.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        kind, params = parse_index_spec(index_spec)
        if kind == "IVF_FLAT" and is_local(uri):
            logger.warning(
                "milvus-lite builds IVF_FLAT with a number of lists of its own (it clustered "
                "2,000 vectors into 128 lists when given nlist=4): nlist is not honoured and "
                "nprobe means another share of the collection; FLAT or HNSW on milvus-lite, or "
                "a Milvus server"
            )
        ids, arrays, meta = read_shards(shard_dirs)  # one encoder, unique ids
        check_ids(ids)
        state = build_state(meta, ids, kind, params, arrays)
        client = connect(uri)
        done = open_for_build(client, collection, meta, state, overwrite)
        ends = np.cumsum([len(a) for a in arrays]).tolist()
        parts = [(ids[hi - len(a) : hi], a) for a, hi in zip(arrays, ends, strict=True)]
        index = cls(client, uri, collection, ids, meta, f"{BACKEND}:{spec_text(kind, params)}")
        index.vectors_sha256 = state["vectors_sha256"]
        skipped = min(done or 0, len(ids))
        with tqdm(
            total=len(ids),
            initial=skipped,
            desc=f"upsert {index.factory}",
            unit="vec",
            disable=not show_progress,
        ) as bar:
            index.upserted = upsert_shards(client, collection, parts, done, batch_size, bar)
        client.flush(collection)
        index._check_count()
        if done is None:  # every row written: a refreshed collection gets its digest now
            record_state(client, collection, state)
        kept = len(ids) - index.upserted
        logger.info("%s: %d rows upserted, %d kept from before", collection, index.upserted, kept)
        return index

    def _check_count(self) -> None:
        n = count_rows(self.client, self.collection)
        if n != len(self.ids):
            msg = f"the Milvus collection holds {n} rows, {len(self.ids)} ids expected"
            raise DataFormatError(self.collection, msg)

    def check_encoder(
        self, name: str, dim: int, normalized: bool, fingerprint: str | None = None
    ) -> None:
        """Raise EncoderMismatchError unless queries from this encoder fit (as `DenseIndex`)."""
        warned = check_query_encoder(
            self.meta, name, dim, normalized, fingerprint, warn=not self._warned_by_name
        )
        self._warned_by_name = self._warned_by_name or warned

    def set_search_params(self, params: str | None) -> None:
        """Check and keep search parameters ("ef=128" for HNSW, "nprobe=16" for IVF_FLAT).

        Later searches use them until others are set (as `DenseIndex.set_search_params`).

        Raises:
            ValueError: Malformed text, a parameter this index type does not take (the message
                names the ones it takes), or a value out of range.
        """
        if params:
            self._search_params = check_search_params(params, self.kind)

    def _params_for(self, limit: int) -> dict[str, Any]:
        """The search parameters of one call returning `limit` hits per query.

        HNSW's ef is at least `limit`: Milvus servers refuse an ef below k, and milvus-lite
        returns fewer and worse hits (so ef=1 with k=10 means ef=10, as does the default 64
        with k=100).
        """
        params = dict(self._search_params)
        if self.kind == "HNSW":
            ef = params.get("ef", DEFAULT_EF)
            if ef < limit and "ef" in params and not self._told_ef:
                logger.info("ef=%d is below k=%d: Milvus searches with ef=k", ef, limit)
                self._told_ef = True
            params["ef"] = max(ef, limit)
        return params

    def search(
        self, queries: np.ndarray, k: int = 100, params: str | None = None
    ) -> list[list[tuple[str, float]]]:
        """Top-k passages per query, ties broken by (-score, id).

        Args:
            queries: (Q, D) query embeddings.
            k: Passages per query (fewer when the index holds fewer; at most 16384).
            params: Milvus search parameters, kept for later calls (`set_search_params`):
                "ef=128" (HNSW; Faiss's "efSearch" is accepted; raised to k when below) or
                "nprobe=16" (IVF_FLAT).

        Returns:
            For each query, (passage id, inner product) pairs, best first.

        Raises:
            ValueError: Bad queries, k or parameters.
            DataFormatError: Milvus failed (one line naming the index directory).
        """
        self.set_search_params(params)
        queries = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, D)
        if queries.ndim != 2 or queries.shape[1] != self.meta.dim:
            raise ValueError(f"queries have shape {queries.shape}, index dim is {self.meta.dim}")
        limit = min(k, len(self.ids))
        if limit > MAX_TOPK:
            raise ValueError(f"Milvus returns at most {MAX_TOPK} hits per query, asked for {k}")
        if limit < 1 or len(queries) == 0:
            return [[] for _ in queries]
        where = self.directory or self.uri

        def search_at(depth: int, which: list[int]) -> list[list[tuple[str, float]]]:
            search_params = {"metric_type": "IP", "params": self._params_for(depth)}
            out: list[list[tuple[str, float]]] = []
            chosen = queries[which]  # (len(which), D)
            with milvus_errors(where, f"search the collection {self.collection!r} at {self.uri}"):
                for start in range(0, len(chosen), SEARCH_BLOCK):
                    block = chosen[start : start + SEARCH_BLOCK]  # (B, D)
                    result = self.client.search(
                        self.collection,
                        data=block,
                        limit=depth,
                        output_fields=[ID_FIELD],
                        search_params=search_params,
                        anns_field=VECTOR_FIELD,
                    )
                    for hits in result:
                        pairs = [(str(h[ID_FIELD]), float(h["distance"])) for h in hits]
                        out.append(sorted(pairs, key=lambda p: rank_key(*p)))
            return out

        # past k while the score at the cut is tied (`ties.top_k_with_ties`), within Milvus's cap
        return top_k_with_ties(search_at, limit, min(len(self.ids), MAX_TOPK), len(queries))

    @property
    def memory_bytes(self) -> int:
        """Best effort: the server's float32 vectors plus the id list held here, in bytes.

        The server reports no memory use: this counts N * D * 4 bytes of vectors and the
        Python id strings (as `DenseIndex` does), plus for HNSW with an explicit M its level-0
        links (2 * M neighbours of 4 bytes per vector); other index structures are not counted.
        """
        size = len(self.ids) * self.meta.dim * 4
        kind, params = parse_index_spec(self.factory.removeprefix(f"{BACKEND}:"))
        if kind == "HNSW" and "M" in params:
            size += len(self.ids) * 2 * int(params["M"]) * 4
        return int(size + sum(len(i) + 49 for i in self.ids))  # 49: a small str object

    def close(self) -> None:
        """Release the client's connection (a local milvus-lite server lives until exit)."""
        self.client.close()

    def save(self, directory: str | Path, settings: dict[str, Any] | None = None) -> Path:
        """Write the descriptor (meta.json, ids.txt) into a directory, meta.json last.

        Only the descriptor's files are replaced (`io.atomic.atomic_files`): a milvus-lite
        database inside the directory (the default `DIR/milvus.db`) stays; an older Faiss
        index file there is removed. A local URI is stored relative to the directory when it was
        given relative or lies beside it (the defaults), so the directory moves with its database.
        """
        directory = Path(directory)
        info = {
            "backend": BACKEND,
            "uri": stored_uri(self.uri, directory),
            "collection": self.collection,
            "embedding": asdict(self.meta),
            "factory": self.factory,
            "ntotal": len(self.ids),
            "vectors_sha256": self.vectors_sha256,
            "memory_bytes": self.memory_bytes,
            "settings": settings or {},
        }
        with atomic_files(directory, last=(META_FILE,), stale=(INDEX_FILE,)) as tmp:
            (tmp / IDS_FILE).write_text("".join(f"{i}\n" for i in self.ids), encoding="utf-8")
            (tmp / META_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
        self.directory = directory
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> MilvusIndex:
        """Open the collection a descriptor names; refuses one that another build replaced.

        Raises:
            EncoderMismatchError: The collection records another encoder than the descriptor.
            DataFormatError: A bad descriptor, a missing database or collection, a collection
                holding other passages (or an unfinished build), or Milvus failing to load it.
            ValueError: The database cannot be opened (e.g. another process has the file).
        """
        directory = Path(directory)
        meta_path = directory / META_FILE
        try:
            info = json.loads(meta_path.read_text(encoding="utf-8"))
            meta = EmbeddingMeta(**info["embedding"])
            uri, collection, factory = info["uri"], info["collection"], info["factory"]
        except FileNotFoundError:
            raise DataFormatError(meta_path, "file not found (not an index directory?)") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataFormatError(meta_path, f"bad index metadata: {e}") from None
        uri = resolve_uri(uri, directory)
        if is_local(uri) and not Path(uri).exists():
            raise DataFormatError(meta_path, f"the Milvus database {uri} is missing", field="uri")
        client = connect(uri)
        with milvus_errors(directory, f"load the collection {collection!r} at {uri}"):
            if not client.has_collection(collection):
                msg = f"no Milvus collection {collection!r} at {uri}"
                raise DataFormatError(meta_path, msg, field="collection")
            ids = (directory / IDS_FILE).read_text(encoding="utf-8").splitlines()
            state, done = recorded_state(client, collection)
            built_with = info.get("vectors_sha256")
            check_finished(state, done, meta, ids, collection, directory, built_with)
            if not (built_with and state and state.get("vectors_sha256")):
                _warn_unchecked_vectors(directory, collection, built_with is None)
            client.load_collection(collection)
            index = cls(client, uri, collection, ids, meta, factory)
            index.vectors_sha256 = built_with
            index._check_count()
        index.directory = directory
        return index
