"""A deterministic fake encoder for index, search and CLI tests (no model, no torch).

Texts become hashed bag-of-words vectors: words shared between a query and a passage raise their
inner product, so small rankings are predictable.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Sequence

import numpy as np

from chatretriever.types import Passage, SessionLike, as_session

_WORD = re.compile(r"\w+")


def hash_vector(text: str, dim: int, salt: str = "") -> np.ndarray:
    """A (dim,) bag-of-words vector: each lowercase word adds 1 to the bucket
    crc32(salt + word) % dim."""
    vec = np.zeros(dim, dtype=np.float32)
    for word in _WORD.findall(text.lower()):
        vec[zlib.crc32((salt + word).encode("utf-8")) % dim] += 1.0
    return vec


class HashEncoder:
    """Implements `chatretriever.retrieval.encoders.Encoder` with hashed bag-of-words vectors.

    Args:
        dim: Embedding size.
        name: Model name stored in embedding metadata.
        normalize: L2-normalise the vectors.
        fail_after_batches: Raise RuntimeError on this many + 1-th call to `encode_passages`
            (simulates a crash in the middle of an encoding job).
        salt: Changes every vector: another "model" under the same name (a retrained one).

    Its `fingerprint` covers what changes its vectors (name, dim, normalize, salt).
    """

    def __init__(
        self,
        dim: int = 64,
        name: str = "fake-hash",
        normalize: bool = True,
        fail_after_batches: int | None = None,
        salt: str = "",
    ) -> None:
        self.dim = dim
        self.name = name
        self.normalize = normalize
        self.salt = salt
        identity = f"hash|{name}|{dim}|{normalize}|{salt}".encode()
        self.fingerprint = hashlib.sha256(identity).hexdigest()[:16]
        self.fail_after_batches = fail_after_batches
        self.passage_batches = 0
        self.passages_encoded = 0
        self.sessions_encoded = 0

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.stack([hash_vector(t, self.dim, self.salt) for t in texts]) if texts else None
        if out is None:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32)  # (B, D)

    def encode_sessions(
        self, sessions: Sequence[SessionLike], batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray:
        texts = [" ".join(t.content for t in as_session(s).turns) for s in sessions]
        self.sessions_encoded += len(texts)
        return self._embed(texts)

    def encode_passages(
        self, passages: Sequence[Passage], batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray:
        if self.fail_after_batches is not None and self.passage_batches >= self.fail_after_batches:
            raise RuntimeError("simulated crash while encoding")
        self.passage_batches += 1
        self.passages_encoded += len(passages)
        return self._embed([f"{p.title} {p.text}" for p in passages])
