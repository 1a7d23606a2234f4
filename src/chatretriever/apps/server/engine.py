"""The model work behind the HTTP API: encode, search (dense, or fused with BM25), incremental
sessions. Runs on the worker thread (never on the event loop), one batch at a time.

Torch-free like `apps.chat`: the encoder does the model work. A ChatRetriever gets an incremental
session encoder (`methods.chatretriever.incremental`) when that module is available, so that a
request with a `conversation_id` encodes only the new turn; any other encoder (or a missing
module) encodes the full session every time.

What encoding a session raises as a ValueError (the template refusing it, a DataFormatError) is
re-raised as `SessionInputError`: the request's messages are at fault, and the server answers
422 naming them, not 500. (The batcher has already retried a failed batch item by item, so the
error reaches only the request that sent that session.)
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from chatretriever.apps.chat import Hit, HybridSide, to_hits
from chatretriever.retrieval.corpus_index import CorpusIndex
from chatretriever.retrieval.encoders import Encoder, fingerprint_of
from chatretriever.retrieval.search import search_hybrid
from chatretriever.types import Passage, Session

logger = logging.getLogger(__name__)

_RETRIEVER_MODULE = "chatretriever.methods.chatretriever.model"


class SessionInputError(ValueError):
    """A session the model refuses to encode: the client's messages are at fault (a 422)."""


@contextmanager
def _session_input() -> Iterator[None]:
    """Re-raise a ValueError from encoding sessions as a SessionInputError."""
    try:
        yield
    except SessionInputError:
        raise
    except ValueError as e:  # DataFormatError included
        raise SessionInputError(str(e)) from e


@dataclass(frozen=True)
class SearchItem:
    """One search request as the worker sees it.

    Attributes:
        session: The conversation so far.
        k: Passages wanted.
        conversation: The key of its incremental cache entry (client id / conversation id), or
            None to encode the whole session.
        hybrid: Fuse the dense hits with the index's BM25 side (the session is then encoded
            whole: `search_hybrid` encodes its own queries).
    """

    session: Session
    k: int
    conversation: str | None = None
    hybrid: bool = False


def make_incremental(encoder: Encoder, max_bytes: int) -> Any | None:
    """An `IncrementalSessionEncoder` for a ChatRetriever, None for any other encoder or when the
    incremental module is not available (the server then encodes whole sessions)."""
    model_module = sys.modules.get(_RETRIEVER_MODULE)  # loaded iff the encoder is a ChatRetriever
    if model_module is None or not isinstance(encoder, model_module.ChatRetriever):
        return None
    try:
        from chatretriever.methods.chatretriever.incremental import IncrementalSessionEncoder
    except ImportError as e:
        logger.info("incremental session encoding is not available (%s): full encodes", e)
        return None
    return IncrementalSessionEncoder(encoder, max_bytes=max_bytes)


class SearchEngine:
    """An encoder and a corpus index, with batch functions for the dynamic batchers.

    Args:
        encoder: The query and passage encoder; it must be the one the index was built with.
        corpus_index: The index (read only: nothing here writes to its directory).
        incremental: An incremental session encoder (see `make_incremental`), or None.
        hybrid: The index's BM25 side and how to fuse it, or None (dense search only).
    """

    def __init__(
        self,
        encoder: Encoder,
        corpus_index: CorpusIndex,
        incremental: Any | None = None,
        hybrid: HybridSide | None = None,
    ) -> None:
        index = corpus_index.index
        index.check_encoder(encoder.name, encoder.dim, encoder.normalize, fingerprint_of(encoder))
        self.encoder = encoder
        self.corpus_index = corpus_index
        self.incremental = incremental
        self.hybrid = hybrid
        self._incremental_stats: dict[str, int] = {}

    @property
    def dim(self) -> int:
        return int(self.encoder.dim)

    def search_batch(self, items: Sequence[SearchItem]) -> list[list[Hit]]:
        """Search for a batch of requests: the dense ones with one forward (those without a
        conversation id) and one index search, the hybrid ones with one `search_hybrid` call.

        Returns:
            One list of hits per item, best first, `item.k` long at most.
        """
        out: list[list[Hit]] = [[] for _ in items]
        dense = [i for i, it in enumerate(items) if not it.hybrid]
        fused = [i for i, it in enumerate(items) if it.hybrid]
        if dense:
            hits = self._dense([items[i] for i in dense])
            for i, h in zip(dense, hits, strict=True):
                out[i] = h
        if fused:
            hits = self._hybrid([items[i] for i in fused])
            for i, h in zip(fused, hits, strict=True):
                out[i] = h
        return out

    def _dense(self, items: Sequence[SearchItem]) -> list[list[Hit]]:
        emb = np.zeros((len(items), self.dim), dtype=np.float32)  # (B, D)
        full = [
            i for i, it in enumerate(items) if it.conversation is None or self.incremental is None
        ]
        if full:
            sessions = [items[i].session for i in full]
            with _session_input():
                emb[full] = self.encoder.encode_sessions(sessions, batch_size=len(full))
        for i, item in enumerate(items):
            if item.conversation is not None and self.incremental is not None:
                with _session_input():
                    emb[i] = self.incremental.encode(item.conversation, item.session)  # (D,)
                # read here, on the model thread: the counters' lock is held during forwards
                self._incremental_stats = dict(self.incremental.stats)
        hits = self.corpus_index.index.search(emb, max(item.k for item in items))
        passages = self.corpus_index.passages
        return [to_hits(h[: it.k], passages) for h, it in zip(hits, items, strict=True)]

    def _hybrid(self, items: Sequence[SearchItem]) -> list[list[Hit]]:
        if self.hybrid is None:
            raise ValueError("hybrid: this index has no BM25 side")
        h = self.hybrid
        # unique ids within the batch (the fused run is keyed by session id), still naming the
        # request in the model's warnings
        sessions = [replace(it.session, id=f"{it.session.id} #{i}") for i, it in enumerate(items)]
        with _session_input():  # search_hybrid encodes the sessions
            run = search_hybrid(
                self.encoder,
                self.corpus_index.index,
                h.bm25,
                sessions,
                max(item.k for item in items),
                h.fusion,
                sparse_formulation=h.formulation,
                depth=h.depth,
                batch_size=len(sessions),
                show_progress=False,
            )
        passages = self.corpus_index.passages
        return [
            to_hits([(d.doc_id, d.score) for d in run.ranked(s.id)[: it.k]], passages)
            for s, it in zip(sessions, items, strict=True)
        ]

    def embed_passages(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One (D,) float32 vector per text, encoded as a passage in one forward."""
        passages = [Passage(id=str(i), text=t) for i, t in enumerate(texts)]
        return list(self.encoder.encode_passages(passages, batch_size=len(passages)))

    def embed_sessions(self, sessions: Sequence[Session]) -> list[np.ndarray]:
        """One (D,) float32 vector per session, encoded as a query in one forward."""
        with _session_input():
            return list(self.encoder.encode_sessions(list(sessions), batch_size=len(sessions)))

    def reset(self, conversation: str) -> None:
        """Forget the incremental cache of one conversation (a no-op without one)."""
        if self.incremental is not None:
            self.incremental.reset(conversation)
            self._incremental_stats = dict(self.incremental.stats)  # on the model thread too

    def incremental_stats(self) -> dict[str, int]:
        """The incremental encoder's counters after the last search that used it (a copy taken
        on the model thread, so reading them never waits for a forward)."""
        return dict(self._incremental_stats)
