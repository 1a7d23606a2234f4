"""Embedding shards: a directory with `embeddings.npy`, `ids.txt` (row order) and `meta.json`."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from chatretriever.errors import DataFormatError
from chatretriever.io.atomic import atomic_dir

EMBEDDINGS = "embeddings.npy"
IDS = "ids.txt"
META = "meta.json"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddingMeta:
    """What produced a set of embeddings; an index refuses queries from another encoder.

    Attributes:
        model: The encoder's name (for people: "chatretriever/final" may name several models).
        dim: Embedding size D.
        dtype: Numpy dtype of the stored vectors.
        normalized: Whether the vectors are L2-normalised.
        count: Number of vectors.
        extra: Free-form details (chunk number, encoding seconds, ...).
        fingerprint: The encoder's content fingerprint (`Encoder.fingerprint`). None in
            directories written before fingerprints existed: those are matched by name.
    """

    model: str
    dim: int
    dtype: str = "float32"
    normalized: bool = True
    count: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None

    def by_name_only(self, other: EmbeddingMeta) -> bool:
        """Whether `same_model` can only compare names (one side records no fingerprint)."""
        return not (self.fingerprint and other.fingerprint)

    def same_model(self, other: EmbeddingMeta) -> bool:
        """Same encoder: equal fingerprints (names may differ: a copied or renamed model), or
        equal names when a side records no fingerprint."""
        if self.by_name_only(other):
            return self.model == other.model
        return self.fingerprint == other.fingerprint

    def compatible_with(self, other: EmbeddingMeta) -> bool:
        """Whether vectors of both can be mixed or compared: `same_model`, dim, normalisation."""
        same_space = (self.dim, self.normalized) == (other.dim, other.normalized)
        return same_space and self.same_model(other)

    def describe(self) -> str:
        """One phrase for messages: "model 'x' (fingerprint 1a2b..., dim 16, normalized)"."""
        fp = f"fingerprint {self.fingerprint}" if self.fingerprint else "no fingerprint"
        norm = "normalized" if self.normalized else "unnormalized"
        return f"model {self.model!r} ({fp}, dim {self.dim}, {norm})"


def warn_if_by_name(where: str | Path, a: EmbeddingMeta, b: EmbeddingMeta) -> bool:
    """Warn that two compatible metadata were matched by model name only; returns whether.

    Directories written before fingerprints existed keep working, but a model retrained in
    place under the same name cannot be told apart from the one that made them.
    """
    if not a.by_name_only(b):
        return False
    logger.warning(
        "%s: a model fingerprint is missing (made by an older version?); matched by the name "
        "%r only: re-encode if that model was retrained since",
        where,
        a.model,
    )
    return True


def write_embeddings(
    directory: str | Path, ids: list[str], embeddings: np.ndarray, meta: EmbeddingMeta
) -> Path:
    """Write one shard atomically: a temp directory is renamed into place when complete."""
    directory = Path(directory)
    if embeddings.ndim != 2 or embeddings.shape[0] != len(ids):
        raise ValueError(f"embeddings {embeddings.shape} do not match {len(ids)} ids")
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate ids in an embedding shard")
    if any(("\n" in i or not i) for i in ids):
        raise ValueError("ids must be non-empty and hold no newline")
    meta = EmbeddingMeta(**{**asdict(meta), "dim": int(embeddings.shape[1]), "count": len(ids)})
    meta = EmbeddingMeta(**{**asdict(meta), "dtype": str(embeddings.dtype)})
    with atomic_dir(directory) as tmp:
        np.save(tmp / EMBEDDINGS, embeddings, allow_pickle=False)
        (tmp / IDS).write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
        (tmp / META).write_text(json.dumps(asdict(meta), indent=2), encoding="utf-8")
    return directory


def read_meta(directory: str | Path) -> EmbeddingMeta:
    path = Path(directory) / META
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return EmbeddingMeta(**raw)
    except FileNotFoundError:
        raise DataFormatError(path, "file not found") from None
    except json.JSONDecodeError as e:
        raise DataFormatError(path, f"bad embedding metadata: {e}") from None
    except TypeError:
        raise DataFormatError(path, _not_embeddings(raw)) from None


def _not_embeddings(raw: Any) -> str:
    """Why a meta.json is not an embedding shard's: an index's, or which fields are wrong."""
    if isinstance(raw, dict) and {"backend", "factory"} & set(raw):
        return (
            "this is a search index's metadata (`chatretriever index` wrote it), not embeddings: "
            "give `encode`'s output directory (a corpus index keeps it in its embeddings/)"
        )
    if not isinstance(raw, dict):
        return f"bad embedding metadata: expected a JSON object, got {type(raw).__name__}"
    known = {f.name for f in fields(EmbeddingMeta)}
    required = {f.name for f in fields(EmbeddingMeta) if f.default is MISSING
                and f.default_factory is MISSING}  # fmt: skip
    unknown, lacking = sorted(set(raw) - known), sorted(required - set(raw))
    parts = [f"unknown fields {', '.join(unknown)}"] * bool(unknown)
    parts += [f"missing fields {', '.join(lacking)}"] * bool(lacking)
    return f"bad embedding metadata: {'; '.join(parts) or 'a field of the wrong type'}"


def read_embeddings(
    directory: str | Path, mmap: bool = True
) -> tuple[list[str], np.ndarray, EmbeddingMeta]:
    """Read one shard; checks that ids, rows and metadata agree. Returns (ids, (N, D), meta)."""
    directory = Path(directory)
    meta = read_meta(directory)
    ids_path = directory / IDS
    if not ids_path.exists():
        raise DataFormatError(ids_path, "file not found")
    ids = ids_path.read_text(encoding="utf-8").splitlines()
    try:
        emb = np.load(directory / EMBEDDINGS, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (FileNotFoundError, ValueError) as e:
        raise DataFormatError(directory / EMBEDDINGS, f"cannot load: {e}") from None
    if emb.ndim != 2 or emb.shape[0] != len(ids):
        raise DataFormatError(
            directory / EMBEDDINGS, f"{emb.shape[0]} rows but {len(ids)} ids in {IDS}"
        )
    if emb.shape[1] != meta.dim:
        raise DataFormatError(
            directory / META, f"dim {meta.dim} but rows have {emb.shape[1]}", field="dim"
        )
    if meta.count and meta.count != len(ids):
        raise DataFormatError(
            directory / META, f"count {meta.count} but {len(ids)} ids", field="count"
        )
    if len(set(ids)) != len(ids):
        dup = next(i for i, c in Counter(ids).items() if c > 1)
        line = ids.index(dup, ids.index(dup) + 1) + 1
        raise DataFormatError(ids_path, f"duplicate id {dup!r}", line=line)
    return ids, emb, meta
