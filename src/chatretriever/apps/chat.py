"""Conversational search over a corpus index: conversation state, ranked hits, results as text,
and grounded answers written from the hits.

A search-only chat session holds only the user's turns: there is no assistant whose answers could
go between them, and an empty assistant turn would be a turn the retriever never saw in training.
When a model answers (`chat --answer`), its answers go between the user's turns, as in the
conversations the retrievers were trained on. Torch-free: the encoder and the answering model do
the model work, and nothing here prints.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from tqdm.auto import tqdm

from chatretriever.retrieval.corpus_index import CorpusIndex
from chatretriever.retrieval.encoders import Encoder, fingerprint_of
from chatretriever.retrieval.fusion import FusionConfig
from chatretriever.retrieval.search import SessionSearcher, search_hybrid
from chatretriever.types import Passage, Run, Session, Turn

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
    """The turns so far (the user's, and the answers when a model answers); `session()` is what
    the retriever reads.

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

    def add_answer(self, text: str) -> None:
        """Append the assistant's answer to the last user turn."""
        if not self.turns or self.turns[-1].role != "user":
            raise ValueError("an answer follows a user turn")
        self.turns.append(Turn("assistant", text.strip()))

    @property
    def user_turns(self) -> int:
        """How many turns the user typed."""
        return sum(t.role == "user" for t in self.turns)

    def reset(self) -> None:
        """Forget every turn."""
        self.turns.clear()

    def session(self) -> Session:
        """The conversation so far as a Session (see the module docstring)."""
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


# ------------------------------------------------------------------------------ grounded answers
class Answerer(Protocol):
    """A model that writes grounded answers: a UniConv (reads whole sessions) or a
    `modeling.grounded.GroundedGenerator` (reads the turns of a conversation)."""

    def answer_batch(
        self, items: Sequence[tuple[Any, Sequence[Passage]]], **kwargs: Any
    ) -> list[str]: ...


def reads_sessions(model: Any) -> bool:
    """Whether an answering model takes Sessions (a retriever that also answers, UniConv) rather
    than turns (a plain chat LLM behind `GroundedGenerator`)."""
    return hasattr(model, "encode_sessions")


def generation_kwargs(model: Any, max_new_tokens: int, batch_size: int = 8) -> dict[str, Any]:
    """The answer length and batch size as `answer_batch` keyword arguments, those the model
    takes per call (a UniConv); {} for one that takes neither (a GroundedGenerator has them as
    settings)."""
    import inspect

    params = inspect.signature(model.answer_batch).parameters
    wanted = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}
    return {name: value for name, value in wanted.items() if name in params}


def hit_passages(hits: Sequence[Hit]) -> list[Passage]:
    """The passages of hits (their ids, titles and texts), best first."""
    return [Passage(h.doc_id, h.text, h.title) for h in hits]


def top_passages(run: Run, passages: Mapping[str, Passage], k: int) -> dict[str, list[Passage]]:
    """The top-k passages of every query of a run, best first (ties by doc id).

    Args:
        run: Retrieved passages per query.
        passages: Passage id -> passage; it must hold every retrieved id in the top k.
        k: Passages per query.

    Returns:
        Query id -> its passages.
    """
    out = {}
    for qid in run.scores:
        top = [d.doc_id for d in run.ranked(qid)[:k]]
        missing = [d for d in top if d not in passages]
        if missing:
            raise ValueError(f"no text for retrieved passage {missing[0]!r} (query {qid!r})")
        out[qid] = [passages[d] for d in top]
    return out


def _prompt_chars(session: Session, passages: Sequence[Passage]) -> int:
    return sum(len(t.content) for t in session.turns) + sum(len(p.text) for p in passages)


def answer_sessions(
    model: Answerer,
    items: Sequence[tuple[Session, Sequence[Passage]]],
    batch_size: int = 8,
    show_progress: bool = False,
    model_kwargs: Mapping[str, Any] | None = None,
) -> list[str]:
    """Grounded answers to sessions from their passages, in input order.

    Items are answered longest first (prompt characters) in calls of `batch_size`, so batches
    hold prompts of similar lengths and the progress bar moves after each call.

    Args:
        model: A UniConv or a GroundedGenerator (see `reads_sessions`).
        items: (session, passages to answer from, best first) per answer; no passages: closed
            book.
        batch_size: Items per `answer_batch` call.
        show_progress: Show a progress bar over items.
        model_kwargs: Passed to every `answer_batch` call (`generation_kwargs`).

    Returns:
        One answer per item.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    whole = reads_sessions(model)
    order = sorted(range(len(items)), key=lambda i: -_prompt_chars(*items[i]))
    answers: list[str] = [""] * len(items)
    with tqdm(total=len(items), desc="answer", unit="turn", disable=not show_progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = [(s if whole else s.turns, list(ps)) for s, ps in (items[i] for i in chunk)]
            for i, answer in zip(
                chunk, model.answer_batch(batch, **(model_kwargs or {})), strict=True
            ):
                answers[i] = answer
            bar.update(len(chunk))
    return answers


def format_answer(text: str, width: int = 100, indent: str = "  ") -> str:
    """An answer as text: "answer: ..." wrapped at `width`, later lines indented."""
    body = " ".join(text.split()) or "(empty answer)"
    return textwrap.fill(
        body, width=width, initial_indent=f"{indent}answer: ", subsequent_indent=indent + "  "
    )
