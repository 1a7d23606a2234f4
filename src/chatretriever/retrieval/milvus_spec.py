"""What a Milvus index build is made of, as plain values: its index spec and the state it records.

An index spec is "TYPE[:key=value,...]" ("FLAT", "HNSW:M=16,efConstruction=200"): Milvus's index
type and build parameters (`parse_index_spec`, spelled back by `spec_text`); search parameters
are "key=value,..." (`check_search_params`, which accepts Faiss's "efSearch" for Milvus's "ef").
`INDEX_KINDS` is what is supported: a spec of another type, or a parameter the type does not
take, is refused when parsed (milvus-lite would store it and fail at every later load), and so
are search parameters that do not apply to an index's type. `parse_params` reads any
"key=value,..." text unchecked.

The state a build records in its collection's properties (`build_state`) names the encoder
(model, dim, normalisation, fingerprint), a digest of the passage ids in order (`ids_digest`),
one of the vectors (`vectors_digest`: an edited passage keeps its id, not its vector) and the
index spec: what decides whether a collection can be resumed, searched or must be rebuilt.

`check_resumable` and `check_finished` compare a recorded state with a build's or a descriptor's.
Pure and torch-free: no client, no `pymilvus`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from chatretriever.errors import DataFormatError
from chatretriever.io.embeddings import EmbeddingMeta
from chatretriever.retrieval.index import IDS_FILE, META_FILE
from chatretriever.retrieval.index_inputs import EncoderMismatchError

DEFAULT_INDEX = "FLAT"
MAX_ID_BYTES = 512  # VARCHAR max_length of the primary key (Milvus counts bytes)
# Faiss names of search parameters -> Milvus names, so `search --params efSearch=64` works on both
_PARAM_ALIASES = {"efSearch": "ef"}


@dataclass(frozen=True)
class IndexKind:
    """What one supported Milvus index type takes: integer parameters with their (least, most).

    Args:
        build: Build parameters (in the index spec, `--factory`).
        search: Search parameters (`search --params`).
    """

    build: dict[str, tuple[int, int]] = field(default_factory=dict)
    search: dict[str, tuple[int, int]] = field(default_factory=dict)


_INT_MAX = 2**31 - 1
# The documented (and tested) index types, with Milvus's ranges for their parameters. AUTOINDEX
# lets Milvus choose the index and its search parameters (milvus-lite: HNSW with ef 64).
INDEX_KINDS: dict[str, IndexKind] = {
    "FLAT": IndexKind(),
    "HNSW": IndexKind({"M": (2, 2048), "efConstruction": (1, _INT_MAX)}, {"ef": (1, _INT_MAX)}),
    "IVF_FLAT": IndexKind({"nlist": (1, 65536)}, {"nprobe": (1, 65536)}),
    "AUTOINDEX": IndexKind(),
}
SUPPORTED_SPECS = "FLAT, HNSW:M=..,efConstruction=.., IVF_FLAT:nlist=.., AUTOINDEX"


def parse_index_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """A Milvus index type with its build parameters from "TYPE[:key=value,...]".

    Args:
        spec: "FLAT" (or "Flat", the Faiss default's spelling), "HNSW:M=32,efConstruction=200",
            "IVF_FLAT:nlist=128", "AUTOINDEX" (`INDEX_KINDS`).

    Returns:
        (index type in upper case, build parameters as integers).

    Raises:
        ValueError: Another index type (a Faiss factory such as "HNSW32" is answered with its
            Milvus spelling), a parameter the type does not take, or a value out of its range.
    """
    kind, _, rest = spec.partition(":")
    kind = kind.strip().upper()
    if kind not in INDEX_KINDS:
        faiss = re.fullmatch(r"(HNSW|IVF)(\d+)([,_].*)?", kind)
        hint = ""
        if faiss:
            name, key = ("HNSW", "M") if faiss[1] == "HNSW" else ("IVF_FLAT", "nlist")
            hint = f" ({spec.strip()!r} is a Faiss factory: for Milvus, {name}:{key}={faiss[2]})"
        raise ValueError(
            f"--factory {spec!r}: Milvus index type {kind!r} is not supported{hint}; "
            f"supported: {SUPPORTED_SPECS}"
        )
    allowed = INDEX_KINDS[kind].build
    params = {}
    for key, value in _pairs(rest):
        params[key] = _checked((f"--factory {spec!r}", f"Milvus {kind}"), key, value, allowed)
    return kind, params


def check_search_params(text: str | None, kind: str) -> dict[str, Any]:
    """Search parameters ("ef=128", "nprobe=16") checked against what an index type takes.

    Args:
        text: "key=value,..." (Faiss's "efSearch" is Milvus's "ef"); None or "": none.
        kind: The index type (`parse_index_spec`).

    Returns:
        {Milvus name: integer}.

    Raises:
        ValueError: Malformed text, a key the index type does not take (naming the ones it
            takes), or a value out of its range.
    """
    allowed = INDEX_KINDS[kind].search if kind in INDEX_KINDS else {}
    what = (f"search parameters (--params) {text!r}", f"a Milvus {kind} index")
    return {_PARAM_ALIASES.get(k, k): _checked(what, k, v, allowed) for k, v in _pairs(text)}


def _checked(
    what: tuple[str, str], key: str, value: str, allowed: dict[str, tuple[int, int]]
) -> int:
    """`value` as an integer in the range `allowed` gives `key`; ValueError naming both.

    Args:
        what: (the option and its text, what takes the parameters), for the messages.
    """
    (option, taker), name = what, _PARAM_ALIASES.get(key, key)
    if name not in allowed:
        takes = ", ".join(allowed) if allowed else "none"
        raise ValueError(f"{option}: {taker} takes no parameter {key!r} (it takes {takes})")
    low, high = allowed[name]
    number = _number(value)
    if not isinstance(number, int) or not low <= number <= high:
        span = f">= {low}" if high == _INT_MAX else f"in [{low}, {high}]"
        raise ValueError(f"{option}: {key} must be an integer {span}, got {value!r}")
    return number


def _pairs(text: str | None) -> list[tuple[str, str]]:
    """ "key=value,key=value" -> [(key, value)], stripped; ValueError on an item without '='."""
    out = []
    for item in filter(None, (s.strip() for s in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"bad Milvus parameter {item!r}: expected key=value")
        out.append((key.strip(), value.strip()))
    return out


def parse_params(text: str | None) -> dict[str, Any]:
    """ "key=value,key=value" -> {key: int, float or str}; Faiss's "efSearch" is Milvus's "ef"."""
    return {_PARAM_ALIASES.get(k, k): _number(v) for k, v in _pairs(text)}


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


def vectors_digest(arrays: Sequence[np.ndarray]) -> str:
    """sha256 of the stored vectors in order (their bytes as stored; the dtype is recorded
    beside it): a passage whose text changed under the same id has another vector."""
    h = hashlib.sha256()
    for a in arrays:
        for start in range(0, len(a), _DIGEST_ROWS):  # bounded memory for a memory-mapped shard
            h.update(memoryview(np.ascontiguousarray(a[start : start + _DIGEST_ROWS])))
    return h.hexdigest()


_DIGEST_ROWS = 65_536


def build_state(
    meta: EmbeddingMeta,
    ids: Sequence[str],
    kind: str,
    params: dict[str, Any],
    vectors: Sequence[np.ndarray] = (),
) -> dict[str, Any]:
    """The state a build records in its collection: encoder, digests, index spec.

    Args:
        meta: Metadata of the encoder (its count and extra are left out: they do not decide
            whether vectors can be compared).
        ids: Passage ids in shard order.
        kind, params: The index type and build parameters (`parse_index_spec`).
        vectors: Each shard's (N_i, D) vectors, in order (`vectors_digest`).

    Returns:
        {"embedding": encoder fields, "ids_sha256": digest, "vectors_sha256": digest,
        "index": {"type", "params"}}.
    """
    return {
        "embedding": {k: v for k, v in asdict(meta).items() if k not in ("count", "extra")},
        "ids_sha256": ids_digest(ids),
        "vectors_sha256": vectors_digest(vectors),
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
    # a build recorded before vector digests existed has none: nothing to compare here, and
    # `milvus_build.open_for_build` refreshes every row of it instead of trusting them
    if recorded.get("vectors_sha256", state["vectors_sha256"]) != state["vectors_sha256"]:
        raise ValueError(
            f"the Milvus collection {collection!r} holds other vectors under these passage ids "
            "than this build (a passage's text, or its encoding, changed): drop it to build "
            "again (--overwrite), or choose another collection"
        )


def check_finished(
    recorded: dict[str, Any] | None,
    done: int,
    meta: EmbeddingMeta,
    ids: Sequence[str],
    collection: str,
    directory: Path,
    vectors_sha256: str | None = None,
) -> None:
    """Raise unless a collection records a finished build of these ids by this encoder.

    Args:
        recorded: The state the collection records; None if it records none.
        done: The leading rows (in id order) it records as upserted.
        meta: The encoder metadata of the index descriptor.
        ids: The descriptor's passage ids, in order.
        collection: The collection's name (for the messages).
        directory: The descriptor's directory (the errors name its files).
        vectors_sha256: The vectors digest the descriptor recorded (None: an older one). When
            either side has none nothing is compared, which `MilvusIndex.load` warns about.

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
    rebuilt = recorded.get("vectors_sha256")
    if vectors_sha256 and rebuilt and rebuilt != vectors_sha256:
        raise DataFormatError(
            directory / META_FILE,
            f"the Milvus collection {collection!r} was rebuilt with other vectors under these "
            "passage ids since this index was built (edited passages): build the index again",
            field="vectors_sha256",
        )
