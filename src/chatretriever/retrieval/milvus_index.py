"""A Milvus collection behind the index interface of `index.DenseIndex` (build, search, save, load).

The vectors live in a Milvus collection (passage id: VARCHAR primary key, vector: FLOAT_VECTOR,
inner-product metric); the index directory is a small descriptor that names it:

    DIR/meta.json    "backend": "milvus", the URI, the collection, the encoder metadata (with its
                     fingerprint), the index type and the caller's settings; written last
    DIR/ids.txt      passage ids in shard order (what `CorpusIndex` checks its passages against)

A URI ending in `.db` is a local milvus-lite database (the CLI's default: `DIR/milvus.db`). The
descriptor stores it relative to its directory when it was given relative or lies beside it
(`stored_uri`), and `load` resolves it from there, so an index directory moves with its database.
Any other URI (`http://host:19530`) names a Milvus server and is kept unchanged. The same client
code talks to both (tested on milvus-lite only).

The collection records the encoder (model, dim, normalisation, fingerprint) and a digest of the
passage ids in its properties: `load` refuses a collection whose encoder differs from the
descriptor's, `search` callers refuse queries of another encoder (`check_encoder`), and a build
into a collection that holds another model or corpus is refused unless `overwrite` drops it.

Loading resumes: rows are upserted shard by shard in batches, and after each shard the number of
leading rows (in id order) that are in is recorded in the collection. A re-run of an interrupted
build skips those rows and upserts, of the others, only the ids the collection does not hold yet
(looked up batch by batch; an id present holds the vector of the same encoder and corpus, both
checked before anything is written).

Torch-free; `pymilvus` (and `milvus-lite` for local files) are imported when used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from chatretriever.errors import DataFormatError, require_extra
from chatretriever.io.embeddings import EmbeddingMeta
from chatretriever.io.files import atomic_files
from chatretriever.retrieval.index import (
    IDS_FILE,
    INDEX_FILE,
    META_FILE,
    EncoderMismatchError,
    check_query_encoder,
    read_shards,
)

logger = logging.getLogger(__name__)

BACKEND = "milvus"
DEFAULT_INDEX = "FLAT"
DEFAULT_BATCH = 1000  # rows per upsert call
ID_FIELD = "id"
VECTOR_FIELD = "vector"
MAX_ID_BYTES = 512  # VARCHAR max_length of the primary key (Milvus counts bytes)
MAX_TOPK = 16_384  # Milvus's limit on hits per query
SEARCH_BLOCK = 256  # queries per search call: bounded gRPC messages
STATE_KEY = "chatretriever.index"  # collection property: encoder, id digest, index type
DONE_KEY = "chatretriever.rows_done"  # collection property: leading rows upserted (per shard)
# Faiss names of search parameters -> Milvus names, so `search --params efSearch=64` works on both
_PARAM_ALIASES = {"efSearch": "ef"}


def is_local(uri: str) -> bool:
    """Whether `uri` is a milvus-lite database file (pymilvus's rule: it ends with `.db`)."""
    return uri.endswith(".db") and not re.match(r"^[a-z]+://", uri)


def parse_index_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """A Milvus index type with its build parameters from "TYPE[:key=value,...]".

    Args:
        spec: "FLAT" (or "Flat", the Faiss default's spelling), "HNSW:M=32,efConstruction=200",
            "IVF_FLAT:nlist=128", "AUTOINDEX", ...

    Returns:
        (index type in upper case, build parameters with numbers parsed).
    """
    kind, _, rest = spec.partition(":")
    kind = kind.strip().upper()
    if not re.fullmatch(r"[A-Z][A-Z0-9_]*", kind):
        raise ValueError(f"bad Milvus index type {spec!r}: e.g. FLAT, HNSW:M=32, IVF_FLAT:nlist=64")
    return kind, parse_params(rest)


def parse_params(text: str | None) -> dict[str, Any]:
    """ "key=value,key=value" -> {key: int, float or str}; Faiss's "efSearch" is Milvus's "ef"."""
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad Milvus parameter {item!r}: expected key=value")
        out[_PARAM_ALIASES.get(key.strip(), key.strip())] = _number(value.strip())
    return out


def spec_text(kind: str, params: dict[str, Any]) -> str:
    """The canonical spelling of an index spec: "HNSW:M=16,efConstruction=200", "FLAT"."""
    return kind + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else "")


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def connect(uri: str) -> Any:
    """A `pymilvus.MilvusClient` for a server URI or a local `.db` file (its folder is made)."""
    pymilvus = require_extra("pymilvus", "milvus", "the Milvus index")
    if is_local(uri):
        require_extra("milvus_lite", "milvus", "a local Milvus database (milvus-lite)")
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    return pymilvus.MilvusClient(uri=uri)


def _check_ids(ids: Sequence[str]) -> None:
    for i in ids:
        if len(i.encode("utf-8")) > MAX_ID_BYTES:
            raise ValueError(
                f"passage id {i[:80]!r}... is {len(i.encode('utf-8'))} bytes long: the Milvus "
                f"backend keeps ids of at most {MAX_ID_BYTES} bytes (use the Faiss backend)"
            )


def ids_digest(ids: Sequence[str]) -> str:
    """sha256 of the passage ids in order: which corpus a collection holds."""
    h = hashlib.sha256()
    for i in ids:
        h.update(i.encode("utf-8") + b"\n")
    return h.hexdigest()


def _encoder_fields(meta: EmbeddingMeta) -> dict[str, Any]:
    """The metadata a collection records: what decides whether vectors can be compared."""
    return {k: v for k, v in asdict(meta).items() if k not in ("count", "extra")}


def _upsert(client: Any, collection: str, rows: list[dict[str, Any]]) -> int:
    """One upsert call (one batch); returns the rows written. Tests wrap it to count or fail."""
    return int(client.upsert(collection, rows)["upsert_count"])


def _state(client: Any, collection: str) -> tuple[dict[str, Any] | None, int]:
    """(the state a build recorded in the collection, leading rows done); (None, 0) if none."""
    props = client.describe_collection(collection).get("properties") or {}
    try:
        return json.loads(props[STATE_KEY]), int(props.get(DONE_KEY, 0))
    except (KeyError, json.JSONDecodeError, ValueError):
        return None, 0


def _recorded_meta(state: dict[str, Any], where: str) -> EmbeddingMeta:
    try:
        return EmbeddingMeta(**state["embedding"])
    except (KeyError, TypeError) as e:
        raise DataFormatError(where, f"bad recorded encoder metadata: {e}") from None


def _create(client: Any, collection: str, meta: EmbeddingMeta, state: dict[str, Any]) -> None:
    """A collection with a VARCHAR primary key, the vector field and an inner-product index."""
    from pymilvus import DataType

    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(ID_FIELD, DataType.VARCHAR, is_primary=True, max_length=MAX_ID_BYTES)
    schema.add_field(VECTOR_FIELD, DataType.FLOAT_VECTOR, dim=meta.dim)
    index_params = client.prepare_index_params()
    kind, params = state["index"]["type"], state["index"]["params"]
    index_params.add_index(VECTOR_FIELD, index_type=kind, metric_type="IP", params=params)
    properties = {STATE_KEY: json.dumps(state, sort_keys=True), DONE_KEY: "0"}
    # Strong: a search right after the build, or a resume's existence check, sees every upsert
    client.create_collection(
        collection, schema=schema, consistency_level="Strong", properties=properties
    )
    # sync=False: the index of an empty collection is there at once; waiting polls the server
    # for a timestamp that milvus-lite does not implement (an error in its log) and sleeps
    client.create_index(collection, index_params, sync=False)
    client.load_collection(collection)


def _open_for_build(
    client: Any, collection: str, meta: EmbeddingMeta, state: dict[str, Any], overwrite: bool
) -> int | None:
    """Create the collection, or check an existing one can be resumed.

    Returns:
        None for a new collection, else the leading rows (in id order) an earlier build
        recorded as upserted.
    """
    if client.has_collection(collection) and overwrite:
        logger.warning("dropping the Milvus collection %r (overwrite)", collection)
        client.drop_collection(collection)
    if not client.has_collection(collection):
        _create(client, collection, meta, state)
        return None
    recorded, done = _state(client, collection)
    if recorded is None:
        raise ValueError(
            f"the Milvus collection {collection!r} was not made by chatretriever: choose "
            "another collection name, or drop it (--overwrite)"
        )
    old = _recorded_meta(recorded, collection)
    if not old.compatible_with(meta):
        raise EncoderMismatchError(
            f"the Milvus collection {collection!r} holds vectors of {old.describe()}, the "
            f"shards come from {meta.describe()}: choose another collection, or drop it "
            "(--overwrite)"
        )
    for key, what in (("ids_sha256", "passage ids"), ("index", "index type")):
        if recorded.get(key) != state[key]:
            raise ValueError(
                f"the Milvus collection {collection!r} holds other {what} than this build "
                f"({recorded.get(key)} != {state[key]}): choose another collection, or drop it "
                "(--overwrite)"
            )
    client.load_collection(collection)
    return done


def _existing(client: Any, collection: str, ids: Sequence[str]) -> set[str]:
    """The ids among `ids` that the collection holds."""
    # JSON string literals are Milvus's escaped double-quoted strings; pymilvus's `ids=` quotes
    # without escaping (an id with a quote would break the filter)
    literals = ",".join(json.dumps(i, ensure_ascii=False) for i in ids)
    rows = client.query(collection, filter=f"{ID_FIELD} in [{literals}]", output_fields=[ID_FIELD])
    return {r[ID_FIELD] for r in rows}


def _count(client: Any, collection: str) -> int:
    (row,) = client.query(collection, filter="", output_fields=["count(*)"])
    return int(row["count(*)"])


def _upsert_shards(
    client: Any,
    collection: str,
    shards: Sequence[tuple[list[str], np.ndarray]],
    done: int | None,
    batch_size: int,
    bar: Any,
) -> int:
    """Upsert the rows after the first `done` in batches, recording each finished shard.

    Args:
        shards: (ids, (N_i, D) vectors) per shard, in order.
        done: Leading rows (in id order) an earlier build finished; None for a new collection
            (nothing there to look up).

    Returns:
        The rows upserted by this call.
    """
    written, end = 0, 0
    for ids, emb in shards:
        end += len(ids)
        first = max(0, (done or 0) - (end - len(ids)))  # rows of this shard recorded as done
        for start in range(first, len(ids), batch_size):
            batch = ids[start : start + batch_size]
            present = _existing(client, collection, batch) if done is not None else set()
            rows = [
                {ID_FIELD: i, VECTOR_FIELD: np.asarray(emb[start + r], dtype=np.float32)}
                for r, i in enumerate(batch)
                if i not in present
            ]  # each vector (D,)
            if rows:
                written += _upsert(client, collection, rows)
            bar.update(len(batch))
        if first < len(ids):
            client.alter_collection_properties(collection, properties={DONE_KEY: str(end)})
    return written


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
        self._warned_by_name = False

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
        ids, arrays, meta = read_shards(shard_dirs)  # one encoder, unique ids
        _check_ids(ids)
        state = {
            "embedding": _encoder_fields(meta),
            "ids_sha256": ids_digest(ids),
            "index": {"type": kind, "params": params},
        }
        client = connect(uri)
        done = _open_for_build(client, collection, meta, state, overwrite)
        ends = np.cumsum([len(a) for a in arrays]).tolist()
        parts = [(ids[hi - len(a) : hi], a) for a, hi in zip(arrays, ends, strict=True)]
        index = cls(client, uri, collection, ids, meta, f"{BACKEND}:{spec_text(kind, params)}")
        skipped = min(done or 0, len(ids))
        with tqdm(
            total=len(ids),
            initial=skipped,
            desc=f"upsert {index.factory}",
            unit="vec",
            disable=not show_progress,
        ) as bar:
            index.upserted = _upsert_shards(client, collection, parts, done, batch_size, bar)
        client.flush(collection)
        index._check_count()
        kept = len(ids) - index.upserted
        logger.info("%s: %d rows upserted, %d kept from before", collection, index.upserted, kept)
        return index

    def _check_count(self) -> None:
        n = _count(self.client, self.collection)
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

    def search(
        self, queries: np.ndarray, k: int = 100, params: str | None = None
    ) -> list[list[tuple[str, float]]]:
        """Top-k passages per query, ties broken by (-score, id).

        Args:
            queries: (Q, D) query embeddings.
            k: Passages per query (fewer when the index holds fewer; at most 16384).
            params: Milvus search parameters, e.g. "ef=128" (HNSW; Faiss's "efSearch" is
                accepted) or "nprobe=16" (IVF).

        Returns:
            For each query, (passage id, inner product) pairs, best first.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)  # (Q, D)
        if queries.ndim != 2 or queries.shape[1] != self.meta.dim:
            raise ValueError(f"queries have shape {queries.shape}, index dim is {self.meta.dim}")
        limit = min(k, len(self.ids))
        if limit > MAX_TOPK:
            raise ValueError(f"Milvus returns at most {MAX_TOPK} hits per query, asked for {k}")
        if limit < 1 or len(queries) == 0:
            return [[] for _ in queries]
        search_params = {"metric_type": "IP", "params": parse_params(params)}
        out: list[list[tuple[str, float]]] = []
        for start in range(0, len(queries), SEARCH_BLOCK):
            block = queries[start : start + SEARCH_BLOCK]  # (B, D)
            result = self.client.search(
                self.collection,
                data=block,
                limit=limit,
                output_fields=[ID_FIELD],
                search_params=search_params,
                anns_field=VECTOR_FIELD,
            )
            for hits in result:
                pairs = [(str(h[ID_FIELD]), float(h["distance"])) for h in hits]
                out.append(sorted(pairs, key=lambda p: (-p[1], p[0])))
        return out

    @property
    def memory_bytes(self) -> int:
        """Best effort: the server's float32 vectors plus the id list held here, in bytes.

        The server reports no memory use: this counts N * D * 4 bytes of vectors and the
        Python id strings (as `DenseIndex` does), plus for HNSW with an explicit M its level-0
        links (2 * M neighbours of 4 bytes per vector); other index structures are not counted.
        """
        size = len(self.ids) * self.meta.dim * 4
        kind, params = parse_index_spec(self.factory.removeprefix(f"{BACKEND}:"))
        if kind.startswith("HNSW") and "M" in params:
            size += len(self.ids) * 2 * int(params["M"]) * 4
        return int(size + sum(len(i) + 49 for i in self.ids))  # 49: a small str object

    def close(self) -> None:
        """Release the client's connection (a local milvus-lite server lives until exit)."""
        self.client.close()

    def save(self, directory: str | Path, settings: dict[str, Any] | None = None) -> Path:
        """Write the descriptor (meta.json, ids.txt) into a directory, meta.json last.

        Only the descriptor's files are replaced (`io.files.atomic_files`): a milvus-lite
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
            "memory_bytes": self.memory_bytes,
            "settings": settings or {},
        }
        with atomic_files(directory, last=(META_FILE,), stale=(INDEX_FILE,)) as tmp:
            (tmp / IDS_FILE).write_text("".join(f"{i}\n" for i in self.ids), encoding="utf-8")
            (tmp / META_FILE).write_text(json.dumps(info, indent=2), encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> MilvusIndex:
        """Open the collection a descriptor names; refuses one that another build replaced.

        Raises:
            EncoderMismatchError: The collection records another encoder than the descriptor.
            DataFormatError: A bad descriptor, a missing database or collection, or a
                collection holding other passages (or an unfinished build).
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
        if not client.has_collection(collection):
            msg = f"no Milvus collection {collection!r} at {uri}"
            raise DataFormatError(meta_path, msg, field="collection")
        ids = (directory / IDS_FILE).read_text(encoding="utf-8").splitlines()
        _check_collection(client, collection, meta, ids, directory)
        client.load_collection(collection)
        index = cls(client, uri, collection, ids, meta, factory)
        index._check_count()
        return index


def _check_collection(
    client: Any, collection: str, meta: EmbeddingMeta, ids: list[str], directory: Path
) -> None:
    """Raise unless the collection holds a finished build of these ids by this encoder."""
    state, done = _state(client, collection)
    if state is None:
        msg = f"the Milvus collection {collection!r} records no chatretriever build"
        raise DataFormatError(directory / META_FILE, msg, field="collection")
    recorded = _recorded_meta(state, collection)
    if not recorded.compatible_with(meta):
        raise EncoderMismatchError(
            f"the Milvus collection {collection!r} holds vectors of {recorded.describe()}, but "
            f"the index {directory} was built with {meta.describe()} (the collection was "
            "rebuilt since): build the index again"
        )
    if state.get("ids_sha256") != ids_digest(ids) or done < len(ids):
        raise DataFormatError(
            directory / IDS_FILE,
            f"the Milvus collection {collection!r} holds other passages than this index, or an "
            "unfinished build: build the index again",
        )


def stored_uri(uri: str, directory: str | Path) -> str:
    """The URI as a descriptor in `directory` records it: a local file relative to `directory`
    when given relative or when it lies under `directory`'s parent, else unchanged."""
    if not is_local(uri):
        return uri
    path, base = os.path.abspath(uri), os.path.abspath(directory)
    within = os.path.commonpath([path, os.path.dirname(base)]) == os.path.dirname(base)
    return os.path.relpath(path, base) if within or not os.path.isabs(uri) else uri


def resolve_uri(uri: str, directory: str | Path) -> str:
    """A descriptor's URI: a relative local file is relative to the descriptor's directory."""
    if not is_local(uri) or os.path.isabs(uri):
        return uri
    return os.path.normpath(os.path.join(directory, uri))
