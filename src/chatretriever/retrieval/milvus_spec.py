"""What a Milvus index build is made of, as plain values: its index spec and the state it records.

An index spec is "TYPE[:key=value,...]" ("FLAT", "HNSW:M=16,efConstruction=200"): Milvus's index
type and build parameters (`parse_index_spec`, spelled back by `spec_text`); search parameters
are "key=value,..." (`parse_params`, which accepts Faiss's "efSearch" for Milvus's "ef").

The state a build records in its collection's properties (`build_state`) names the encoder
(model, dim, normalisation, fingerprint), a digest of the passage ids in order (`ids_digest`) and
the index spec: what decides whether a collection can be resumed, searched or must be rebuilt.

`check_resumable` and `check_finished` compare a recorded state with a build's or a descriptor's.
Pure and torch-free: no client, no `pymilvus`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.embeddings import EmbeddingMeta
from chatretriever.retrieval.index import IDS_FILE, META_FILE, EncoderMismatchError

DEFAULT_INDEX = "FLAT"
MAX_ID_BYTES = 512  # VARCHAR max_length of the primary key (Milvus counts bytes)
# Faiss names of search parameters -> Milvus names, so `search --params efSearch=64` works on both
_PARAM_ALIASES = {"efSearch": "ef"}


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


def check_ids(ids: Sequence[str]) -> None:
    """Raise ValueError, naming the id, when one is longer than the primary key holds."""
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


def build_state(
    meta: EmbeddingMeta, ids: Sequence[str], kind: str, params: dict[str, Any]
) -> dict[str, Any]:
    """The state a build records in its collection: encoder, passage ids digest, index spec.

    Args:
        meta: Metadata of the encoder (its count and extra are left out: they do not decide
            whether vectors can be compared).
        ids: Passage ids in shard order.
        kind, params: The index type and build parameters (`parse_index_spec`).

    Returns:
        {"embedding": encoder fields, "ids_sha256": digest, "index": {"type", "params"}}.
    """
    return {
        "embedding": {k: v for k, v in asdict(meta).items() if k not in ("count", "extra")},
        "ids_sha256": ids_digest(ids),
        "index": {"type": kind, "params": params},
    }


def _check_recorded_meta(
    state: dict[str, Any], meta: EmbeddingMeta, collection: str, against: str, fix: str
) -> None:
    """Raise unless the encoder metadata a recorded `build_state` names matches `meta`.

    Args:
        against: What `meta` belongs to, e.g. "the shards come from" (for the message).
        fix: What to do about a mismatch (for the message).

    Raises:
        DataFormatError: The state holds no valid encoder metadata.
        EncoderMismatchError: It names another encoder.
    """
    try:
        old = EmbeddingMeta(**state["embedding"])
    except (KeyError, TypeError) as e:
        raise DataFormatError(collection, f"bad recorded encoder metadata: {e}") from None
    if not old.compatible_with(meta):
        raise EncoderMismatchError(
            f"the Milvus collection {collection!r} holds vectors of {old.describe()}, "
            f"{against} {meta.describe()}: {fix}"
        )


def check_resumable(
    recorded: dict[str, Any] | None, state: dict[str, Any], meta: EmbeddingMeta, collection: str
) -> None:
    """Raise unless a collection recording `recorded` can take (or resume) a build of `state`.

    Args:
        recorded: The state the existing collection records; None if it records none.
        state: This build's `build_state`.
        meta: This build's encoder metadata.
        collection: The collection's name (for the messages).

    Raises:
        EncoderMismatchError: The collection holds vectors of another encoder.
        ValueError: It was not made by chatretriever, or holds other passage ids or another
            index type.
    """
    if recorded is None:
        raise ValueError(
            f"the Milvus collection {collection!r} was not made by chatretriever: choose "
            "another collection name, or drop it (--overwrite)"
        )
    _check_recorded_meta(recorded, meta, collection, "the shards come from",
                         "choose another collection, or drop it (--overwrite)")  # fmt: skip
    for key, what in (("ids_sha256", "passage ids"), ("index", "index type")):
        if recorded.get(key) != state[key]:
            raise ValueError(
                f"the Milvus collection {collection!r} holds other {what} than this build "
                f"({recorded.get(key)} != {state[key]}): choose another collection, or drop it "
                "(--overwrite)"
            )


def check_finished(
    recorded: dict[str, Any] | None,
    done: int,
    meta: EmbeddingMeta,
    ids: Sequence[str],
    collection: str,
    directory: Path,
) -> None:
    """Raise unless a collection records a finished build of these ids by this encoder.

    Args:
        recorded: The state the collection records; None if it records none.
        done: The leading rows (in id order) it records as upserted.
        meta: The encoder metadata of the index descriptor.
        ids: The descriptor's passage ids, in order.
        collection: The collection's name (for the messages).
        directory: The descriptor's directory (the errors name its files).

    Raises:
        EncoderMismatchError: The collection records another encoder (it was rebuilt since).
        DataFormatError: It records no build, other passages, or an unfinished build.
    """
    if recorded is None:
        msg = f"the Milvus collection {collection!r} records no chatretriever build"
        raise DataFormatError(directory / META_FILE, msg, field="collection")
    _check_recorded_meta(recorded, meta, collection, f"but the index {directory} was built with",
                         "the collection was rebuilt since; build the index again")  # fmt: skip
    if recorded.get("ids_sha256") != ids_digest(ids) or done < len(ids):
        raise DataFormatError(
            directory / IDS_FILE,
            f"the Milvus collection {collection!r} holds other passages than this index, or an "
            "unfinished build: build the index again",
        )
