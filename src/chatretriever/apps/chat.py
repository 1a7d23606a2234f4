"""Conversational search over a corpus index: conversation state, ranked hits, results as text.

A chat session holds only the user's turns: this search has no assistant whose answers could go
between them, and an empty assistant turn would be a turn the retriever never saw in training.
Torch-free: the encoder does the model work, and nothing here prints.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from chatretriever.retrieval.corpus_index import CorpusIndex
from chatretriever.retrieval.encoders import Encoder, fingerprint_of
from chatretriever.retrieval.fusion import FusionConfig
from chatretriever.retrieval.search import SessionSearcher, search_hybrid
from chatretriever.types import Passage, Session, Turn

SNIPPET_CHARS = 200


@dataclass(frozen=True)
class Hit:
    """One retrieved passage, ready to show."""

    rank: int
    doc_id: str
    score: float
    title: str = ""
    text: str = ""


class Conversation:
    """The user turns typed so far; `session()` is what the retriever reads.

    Args:
        id_prefix: Session ids are "<prefix>::<number of turns>".
    """

    def __init__(self, id_prefix: str = "chat") -> None:
        self.id_prefix = id_prefix
        self.turns: list[Turn] = []

    def __len__(self) -> int:
        return len(self.turns)

    def add(self, text: str) -> Session:
        """Append a user turn and return the conversation so far."""
        text = text.strip()
        if not text:
            raise ValueError("a turn needs some text")
        self.turns.append(Turn("user", text))
        return self.session()

    def reset(self) -> None:
        """Forget every turn."""
        self.turns.clear()

    def session(self) -> Session:
        """The conversation so far as a Session (user turns only, see the module docstring)."""
        if not self.turns:
            raise ValueError("the conversation is empty")
        return Session(id=f"{self.id_prefix}::{len(self.turns)}", turns=tuple(self.turns))


@dataclass(frozen=True)
class HybridSide:
    """A BM25 side fused with the dense hits (`chat --hybrid`).

    Attributes:
        bm25: The BM25 retriever of the same passages (`baselines.BM25Retriever`).
        formulation: Its query formulation ("last_turn", "all_user_turns", ...).
        fusion: How the two rankings are fused.
        depth: Hits of each side fused.
    """

    bm25: SessionSearcher
    formulation: str = "last_turn"
    fusion: FusionConfig = FusionConfig()
    depth: int = 100


class ChatSearcher:
    """Retrieves passages for a whole conversation with one encoder and one corpus index.

    Args:
        encoder: The query encoder; it must be the one the index was built with.
        corpus_index: The index (and, to show texts, its passages).
        k: Passages per turn.
        hybrid: Fuse the dense hits with a BM25 side (None: dense only).
    """

    def __init__(
        self,
        encoder: Encoder,
        corpus_index: CorpusIndex,
        k: int = 5,
        hybrid: HybridSide | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        index, fingerprint = corpus_index.index, fingerprint_of(encoder)
        index.check_encoder(encoder.name, encoder.dim, encoder.normalize, fingerprint)
        self.encoder = encoder
        self.corpus_index = corpus_index
        self.k = k
        self.hybrid = hybrid

    def search(self, session: Session) -> list[Hit]:
        """The top-k passages for a conversation (all of its turns), best first."""
        if self.hybrid is not None:
            h = self.hybrid
            run = search_hybrid(
                self.encoder,
                self.corpus_index.index,
                h.bm25,
                [session],
                self.k,
                h.fusion,
                sparse_formulation=h.formulation,
                depth=h.depth,
                batch_size=1,
                show_progress=False,
            )
            scored = [(d.doc_id, d.score) for d in run.ranked(session.id)]
            return to_hits(scored, self.corpus_index.passages)
        emb = self.encoder.encode_sessions([session], batch_size=1)  # (1, D)
        (hits,) = self.corpus_index.index.search(emb, self.k)
        return to_hits(hits, self.corpus_index.passages)


def to_hits(
    scored: Iterable[tuple[str, float]], passages: Mapping[str, Passage] | None = None
) -> list[Hit]:
    """(doc id, score) pairs, best first, as Hits with titles and texts where known."""
    out = []
    for rank, (doc_id, score) in enumerate(scored, start=1):
        p = passages.get(doc_id) if passages else None
        out.append(Hit(rank, doc_id, float(score), p.title if p else "", p.text if p else ""))
    return out


def snippet(text: str, max_chars: int = SNIPPET_CHARS) -> str:
    """The start of a text on one line, cut at a word boundary."""
    return textwrap.shorten(" ".join(text.split()), width=max_chars, placeholder=" ...")


def format_hits(
    hits: Sequence[Hit],
    relevant: Iterable[str] = (),
    snippet_chars: int = SNIPPET_CHARS,
    indent: str = "  ",
) -> str:
    """Hits as text: one line with rank, score, title and id, then an indented snippet.

    Args:
        hits: The results, best first.
        relevant: Ids to mark with "*" (judged relevant).
        snippet_chars: Length of each snippet; 0 leaves snippets out.
        indent: Prefix of every line.

    Returns:
        The lines, joined by newlines ("(no results)" when there are none).
    """
    if not hits:
        return f"{indent}(no results)"
    marked = set(relevant)
    lines = []
    for h in hits:
        mark = "*" if h.doc_id in marked else " "
        title = h.title or h.doc_id
        lines.append(f"{indent}{mark}{h.rank:>2}. [{h.score:.3f}] {title} ({h.doc_id})")
        if snippet_chars and h.text:
            lines.append(f"{indent}      {snippet(h.text, snippet_chars)}")
    return "\n".join(lines)
