"""What goes into an index, checked: embedding shards that form one corpus, and queries of the
encoder that built it.

Shared by every backend (`index.DenseIndex`, `milvus_index.MilvusIndex`): shards of one encoder
with distinct passage ids, and `EncoderMismatchError` for queries (or shards) of another one.
Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from chatretriever.io.embeddings import EmbeddingMeta, read_embeddings, warn_if_by_name
from chatretriever.retrieval.encode import list_shards
from chatretriever.types import batch


class EncoderMismatchError(ValueError):
    """Queries (or shards) come from another encoder than the one that built the index: another
    model, or the same name with other weights (a model retrained in place)."""


def duplicate_id_message(dirs: Sequence[str | Path], ids: Sequence[list[str]]) -> str:
    """Name the first passage id that two shards (or one shard twice) hold, and where."""
    seen: dict[str, str | Path] = {}
    for d, shard_ids in zip(dirs, ids, strict=True):
        for i in shard_ids:
            if i in seen:
                where = f"{seen[i]} and {d}" if seen[i] != d else f"{d} (twice)"
                return f"passage id {i!r} occurs in {where}: give each shard once"
            seen[i] = d
    return "a passage id occurs twice"


def read_shards(
    shard_dirs: Sequence[str | Path],
) -> tuple[list[str], list[np.ndarray], EmbeddingMeta]:
    """Embedding shards (see `encode.list_shards`) checked to form one corpus.

    Returns:
        (passage ids in shard order, each shard's (N_i, D) vectors, the metadata with the total
        count). Raises EncoderMismatchError when shards come from different encoders (by
        fingerprint; by name for shards written before fingerprints existed) and ValueError
        when there are none or a passage id occurs twice.
    """
    shard_dirs = list_shards(  # an encode job's output directory is expanded into its chunks
        batch(shard_dirs, "shard_dirs", "directories")
    )
    if not shard_dirs:
        raise ValueError("no embedding shards to index")
    shards = [read_embeddings(d) for d in shard_dirs]
    meta = shards[0][2]
    for d, (_, _, m) in zip(shard_dirs, shards, strict=True):
        if not m.compatible_with(meta):
            raise EncoderMismatchError(
                f"{d} was encoded by {m.describe()}, but {shard_dirs[0]} by {meta.describe()}: "
                "encode every shard with one model"
            )
    for _, _, m in shards[1:]:
        if warn_if_by_name(shard_dirs[0], meta, m):
            break  # once is enough
    ids = [i for shard_ids, _, _ in shards for i in shard_ids]
    if len(set(ids)) != len(ids):
        raise ValueError(duplicate_id_message(shard_dirs, [s[0] for s in shards]))
    meta = EmbeddingMeta(**{**asdict(meta), "count": len(ids), "extra": {}})
    return ids, [emb for _, emb, _ in shards], meta


def check_query_encoder(
    meta: EmbeddingMeta,
    name: str,
    dim: int,
    normalized: bool,
    fingerprint: str | None = None,
    warn: bool = True,
) -> bool:
    """Raise EncoderMismatchError unless queries of this encoder fit an index built by `meta`.

    Args:
        meta: The index's encoder metadata.
        name: The query encoder's name.
        dim: Its embedding size.
        normalized: Whether its vectors are L2-normalised.
        fingerprint: Its fingerprint; None (or none in `meta`): names are compared.
        warn: Log that names alone were compared, when a side records no fingerprint.

    Returns:
        Whether that warning was logged.
    """
    query = EmbeddingMeta(model=name, dim=dim, normalized=normalized, fingerprint=fingerprint)
    if not meta.compatible_with(query):
        raise EncoderMismatchError(_mismatch(meta, query))
    return warn and warn_if_by_name(f"index of {meta.model!r}", meta, query)


def _mismatch(index: EmbeddingMeta, query: EmbeddingMeta) -> str:
    """The one-line message of queries that do not fit an index."""
    why = ""
    if index.model == query.model and not index.same_model(query):
        why = (
            " (same name, other weights or settings: retrained, another model saved so, or a "
            "--dtype other than the index's)"
        )
    return (
        f"the index was built with {index.describe()}, but the queries come from "
        f"{query.describe()}{why}: encode the corpus again with this model, or search with "
        "the model that built the index"
    )
