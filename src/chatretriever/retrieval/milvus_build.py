"""Writing a Milvus collection for `milvus_index.MilvusIndex.build`: its schema and recorded
state, and the resumable upsert of embedding shards (see `milvus_index` for the layout).

Torch-free; the pymilvus client is passed in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from chatretriever.io.embeddings import EmbeddingMeta
from chatretriever.retrieval.milvus_spec import MAX_ID_BYTES, check_resumable

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 1000  # rows per upsert call
ID_FIELD = "id"
VECTOR_FIELD = "vector"
STATE_KEY = "chatretriever.index"  # collection property: encoder, id digest, index type
DONE_KEY = "chatretriever.rows_done"  # collection property: leading rows upserted (per shard)


def _upsert(client: Any, collection: str, rows: list[dict[str, Any]]) -> int:
    """One upsert call (one batch); returns the rows written. Tests wrap it to count or fail."""
    return int(client.upsert(collection, rows)["upsert_count"])


def recorded_state(client: Any, collection: str) -> tuple[dict[str, Any] | None, int]:
    """(the state a build recorded in the collection, leading rows done); (None, 0) if none."""
    props = client.describe_collection(collection).get("properties") or {}
    try:
        return json.loads(props[STATE_KEY]), int(props.get(DONE_KEY, 0))
    except (KeyError, json.JSONDecodeError, ValueError):
        return None, 0


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


def open_for_build(
    client: Any, collection: str, meta: EmbeddingMeta, state: dict[str, Any], overwrite: bool
) -> int | None:
    """Create the collection, or check an existing one can be resumed.

    A collection recorded before vector digests existed holds vectors that cannot be compared
    with this build's (an edited passage keeps its id): it is refreshed, every row upserted
    again, and `record_state` adds the digest once all are in (an interrupted refresh leaves
    none, so its re-run refreshes again rather than trust rows it did not reach).

    Returns:
        None when every row is to be written (a new collection, or one refreshed), else the
        leading rows (in id order) an earlier build recorded as upserted.
    """
    if client.has_collection(collection) and overwrite:
        logger.warning("dropping the Milvus collection %r (overwrite)", collection)
        client.drop_collection(collection)
    if not client.has_collection(collection):
        _create(client, collection, meta, state)
        return None
    recorded, done = recorded_state(client, collection)
    check_resumable(recorded, state, meta, collection)
    client.load_collection(collection)
    if recorded is not None and "vectors_sha256" not in recorded:
        logger.warning(
            "the Milvus collection %r was built before chatretriever recorded a digest of its "
            "vectors: they cannot be compared with these shards, so every row is upserted "
            "again (once: the digest is recorded when all are in)",
            collection,
        )
        return None
    return done


def record_state(client: Any, collection: str, state: dict[str, Any]) -> None:
    """Record a build's state (with its vectors digest) in the collection, once every row of a
    refresh is in (`open_for_build`); a new collection recorded it when created."""
    properties = {STATE_KEY: json.dumps(state, sort_keys=True)}
    client.alter_collection_properties(collection, properties=properties)


def _existing(client: Any, collection: str, ids: Sequence[str]) -> set[str]:
    """The ids among `ids` that the collection holds."""
    # JSON string literals are Milvus's escaped double-quoted strings; pymilvus's `ids=` quotes
    # without escaping (an id with a quote would break the filter)
    literals = ",".join(json.dumps(i, ensure_ascii=False) for i in ids)
    rows = client.query(collection, filter=f"{ID_FIELD} in [{literals}]", output_fields=[ID_FIELD])
    return {r[ID_FIELD] for r in rows}


def count_rows(client: Any, collection: str) -> int:
    (row,) = client.query(collection, filter="", output_fields=["count(*)"])
    return int(row["count(*)"])


def upsert_shards(
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
