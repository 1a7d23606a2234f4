"""What the runs search with: encoders moved to a device, the rewriting LLM, dense indexes.

Dense search uses a Faiss Flat index when Faiss is installed, else `ExactIndex`, an exact numpy
top-k, so runs can be made on a machine with only torch and transformers.
"""

from __future__ import annotations

import gc
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chatretriever.io.embeddings import EmbeddingMeta
from chatretriever.retrieval.encoders import Encoder
from chatretriever.retrieval.index_inputs import EncoderMismatchError, read_shards


class ExactIndex:
    """Exact inner-product top-k in numpy: the stand-in for a Faiss Flat `DenseIndex`.

    Same `check_encoder` / `search` interface as `chatretriever.retrieval.index.DenseIndex`, so
    `search.search_dense` takes either.
    """

    factory = "numpy-exact"

    def __init__(self, ids: list[str], vectors: np.ndarray, meta: EmbeddingMeta) -> None:
        if len(ids) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
        self.ids = ids
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, D)
        self.meta = meta

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, shard_dirs: Sequence[str | Path]) -> ExactIndex:
        """Load embedding shards (see `encode.list_shards`) into memory, in order."""
        ids, arrays, meta = read_shards(shard_dirs)
        return cls(ids, np.concatenate([np.asarray(e, dtype=np.float32) for e in arrays]), meta)

    def check_encoder(
        self, name: str, dim: int, normalized: bool, fingerprint: str | None = None
    ) -> None:
        """Raise EncoderMismatchError unless queries from this encoder fit (as `DenseIndex`)."""
        query = EmbeddingMeta(model=name, dim=dim, normalized=normalized, fingerprint=fingerprint)
        if not self.meta.compatible_with(query):
            raise EncoderMismatchError(
                f"the corpus was encoded by {self.meta.describe()}, the queries come from "
                f"{query.describe()}"
            )

    def search(
        self, queries: np.ndarray, k: int = 100, params: str | None = None, block: int = 256
    ) -> list[list[tuple[str, float]]]:
        """Top-k (passage id, score) per query, best first; `params` is accepted and ignored."""
        queries = np.asarray(queries, dtype=np.float32)  # (Q, D)
        if queries.ndim != 2 or queries.shape[1] != self.meta.dim:
            raise ValueError(f"queries have shape {queries.shape}, index dim is {self.meta.dim}")
        k = min(k, len(self.ids))
        out: list[list[tuple[str, float]]] = []
        for start in range(0, len(queries), block):  # bounded memory: (block, N) scores
            scores = queries[start : start + block] @ self.vectors.T  # (B, N)
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (B, k), unordered
            for row, cand in zip(scores, top, strict=True):
                order = cand[np.lexsort((cand, -row[cand]))]  # by -score, then row
                out.append([(self.ids[r], float(row[r])) for r in order])
        return out


def have_faiss() -> bool:
    return importlib.util.find_spec("faiss") is not None


def build_index(shard_dirs: Sequence[str | Path]) -> Any:
    """A Faiss Flat `DenseIndex` over embedding shards when Faiss is installed, else ExactIndex."""
    if have_faiss():
        from chatretriever.retrieval.index import DenseIndex

        return DenseIndex.build(shard_dirs)
    return ExactIndex.build(shard_dirs)


def load_model(spec: str, device: str | None) -> Encoder:
    """`registry.load_encoder(spec)`, moved to `device` when one is given.

    `load_encoder` takes no device (both model classes default to the current accelerator), so
    the loaded model is moved: ChatRetriever is a torch module, TextEmbedder holds `.model`.
    """
    from chatretriever.apps.registry import load_encoder

    encoder = load_encoder(spec)
    if device is not None:
        target = encoder if hasattr(encoder, "to") else getattr(encoder, "model", None)
        if target is not None and hasattr(target, "to"):
            target.to(device)
    return encoder


def device_of(encoder: Encoder) -> str | None:
    """Where an encoder's model runs ("cpu", "cuda:0"), when it has a torch model."""
    device = getattr(encoder, "device", None)
    model = getattr(encoder, "model", None)
    if device is None and model is not None and hasattr(model, "parameters"):
        device = next(model.parameters()).device
    return None if device is None else str(device)


def release_memory() -> None:
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def make_generator(model: str, device: str | None, max_new_tokens: int) -> Callable:
    """The rewriting LLM (`rewrite.hf_generator`), loaded on its first call only."""
    from chatretriever.retrieval.rewrite import hf_generator

    loaded: list[Callable] = []

    def generate(messages: list[dict[str, str]]) -> str:
        if not loaded:
            loaded.append(hf_generator(model, max_new_tokens, device=device))
        return loaded[0](messages)

    return generate
