"""The one small interface every retriever model implements (ChatRetriever, baselines, fakes).

Torch-free on purpose: index, search and the server only need this protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from chatretriever.types import Passage, SessionLike


@runtime_checkable
class Encoder(Protocol):
    """Maps sessions and passages into one vector space.

    Attributes:
        name: Names the model for people (e.g. "chatretriever/final"); stored in metadata.
        fingerprint: A short hex hash of what the model computes (its weights, settings and
            precision): two different models never share one, the same model saved twice or
            copied keeps it. Embeddings, indexes and cached runs record it, and vectors of
            another fingerprint are refused.
        dim: Embedding size D.
        normalize: Whether returned vectors are L2-normalised.
    """

    name: str
    fingerprint: str
    dim: int
    normalize: bool

    def encode_sessions(
        self, sessions: Sequence[SessionLike], batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray:
        """Returns (B, D) float32 embeddings of the sessions."""
        ...

    def encode_passages(
        self, passages: Sequence[Passage], batch_size: int = 16, show_progress: bool = False
    ) -> np.ndarray:
        """Returns (B, D) float32 embeddings of the passages."""
        ...


def fingerprint_of(encoder: Encoder) -> str | None:
    """The encoder's fingerprint; None for an encoder written before the attribute existed
    (its vectors are then told apart by name only)."""
    value = getattr(encoder, "fingerprint", None)
    return str(value) if value else None
