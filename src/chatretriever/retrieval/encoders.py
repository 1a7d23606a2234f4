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
        name: Identifies the model and its settings; stored in embedding/index metadata.
        dim: Embedding size D.
        normalize: Whether returned vectors are L2-normalised.
    """

    name: str
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
