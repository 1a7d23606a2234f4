"""Core records: passages, sessions, relevance judgments and runs. Stdlib only."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")


def _check_id(value: Any, name: str) -> None:
    """Ids are non-empty strings: runs and qrels key on them (1 and "1" would never meet)."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__} {value!r}")
    if not value:
        raise ValueError(f"{name} must be a non-empty string")


@dataclass(frozen=True)
class Passage:
    """A retrievable unit: BEIR-style id, optional title, text, free metadata."""

    id: str
    text: str
    title: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_id(self.id, "Passage.id")
        if not isinstance(self.text, str) or not isinstance(self.title, str):
            raise TypeError(f"Passage {self.id!r}: text and title must be strings")


def passage_text(passage: Passage | Mapping[str, Any] | str | Any) -> str:
    """The one text of a passage: "title\\ntext", or the text when there is no title.

    What ChatRetriever encodes as a passage's message (`modeling.template`), what BM25 indexes
    and what hard-negative mining searches. A passage may be a `Passage`, a string, or a
    mapping with "text" (and optional "title"), like a BEIR corpus line.
    """
    if isinstance(passage, str):
        return passage
    if isinstance(passage, Mapping):
        if not isinstance(passage.get("text"), str):
            raise ValueError(
                f"a passage mapping needs a string 'text' field, got keys {sorted(passage)}"
            )
        title, text = passage.get("title") or "", passage["text"]
    else:
        title, text = getattr(passage, "title", "") or "", passage.text
    return f"{title}\n{text}" if title else text


@dataclass(frozen=True)
class Turn:
    """One chat message in the OpenAI style."""

    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Turn.role must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise ValueError("Turn.content must be a string")

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Session:
    """A conversation that ends with the current user question.

    Attributes:
        id: Query id used in qrels and runs.
        turns: Messages, oldest first; the last one is the current user question.
        rewrite: A standalone rewrite of the current question, when the dataset has one.
        response: The reference answer to the current question, when known.
        metadata: Anything else the dataset carries (topic, domain, ...).
    """

    id: str
    turns: tuple[Turn, ...]
    rewrite: str | None = None
    response: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_id(self.id, "Session.id")
        if isinstance(self.turns, list):  # frozen: a list given is kept as the tuple it names
            object.__setattr__(self, "turns", tuple(self.turns))
        if not isinstance(self.turns, tuple) or not all(isinstance(t, Turn) for t in self.turns):
            raise TypeError(f"Session {self.id!r}: turns must be a tuple of Turn")
        if not self.turns:
            raise ValueError("Session.turns must not be empty")
        if self.turns[-1].role != "user":
            raise ValueError("Session must end with a user turn (the current question)")

    @classmethod
    def from_messages(
        cls, id: str, messages: Iterable[Mapping[str, str] | Turn], **kwargs: Any
    ) -> Session:
        """Build a session from `{"role", "content"}` dicts (or Turns)."""
        turns = tuple(
            m if isinstance(m, Turn) else Turn(role=m["role"], content=m["content"])
            for m in messages
        )
        return cls(id=id, turns=turns, **kwargs)

    @property
    def question(self) -> str:
        """The current (last) user question."""
        return self.turns[-1].content

    @property
    def history(self) -> tuple[Turn, ...]:
        """All turns before the current question."""
        return self.turns[:-1]

    def messages(self) -> list[dict[str, str]]:
        """The turns as OpenAI-style dicts."""
        return [t.to_dict() for t in self.turns]


@dataclass(frozen=True)
class Qrel:
    """A graded relevance judgment."""

    query_id: str
    doc_id: str
    relevance: int

    def __post_init__(self) -> None:
        _check_id(self.query_id, "Qrel.query_id")
        _check_id(self.doc_id, "Qrel.doc_id")
        if isinstance(self.relevance, bool) or not isinstance(self.relevance, numbers.Integral):
            raise TypeError(f"Qrel.relevance must be an int, got {self.relevance!r}")


@dataclass(frozen=True)
class ScoredDoc:
    """One retrieved document for one query."""

    query_id: str
    doc_id: str
    score: float


# A session given as a Session object or as a list of {"role", "content"} chat messages.
SessionLike = Session | str | Sequence[Mapping[str, str]]


def as_session(s: SessionLike, id: str = "q") -> Session:
    """Accept a Session, a list of chat-message dicts, or a question string (one user turn)."""
    if isinstance(s, Session):
        return s
    return Session.from_messages(id, as_messages(s))


def as_messages(s: SessionLike) -> list[Any]:
    """The messages of a session given as a list of them (or Turns), or as a question string
    (one user turn; iterating the string would give one message per character)."""
    if isinstance(s, Session):
        return list(s.turns)
    if isinstance(s, str):
        return [{"role": "user", "content": s}]
    return list(s)


def batch(items: Any, name: str, many: str) -> list[Any]:
    """A batch argument as a list. One item given bare (a string, a mapping, a Session), which
    would be iterated item by item (a string character by character), is a TypeError."""
    if isinstance(items, (str, bytes, Mapping, Session)) or not isinstance(items, Iterable):
        kind = type(items).__name__
        raise TypeError(f"{name} must be a list of {many}, got a {kind}: wrap one in a list")
    return list(items)


def as_sessions(items: Any, name: str = "sessions") -> list[Session]:
    """Every item of a batch as a Session: a Session, a list of {role, content} messages, or a
    question string (a one-turn session, as sentence-transformers' `encode(["query"])`); an
    error names the item (`sessions[3]`) at fault."""
    out = []
    for i, s in enumerate(batch(items, name, "sessions")):
        if isinstance(s, Session):
            out.append(s)
            _check_turns(s, f"{name}[{i}]")
            continue
        if isinstance(s, Mapping):
            raise TypeError(
                f"{name}[{i}] is one message, not a session: pass a list of sessions, each a "
                "Session, a list of {role, content} messages or a question"
            )
        if isinstance(s, str):  # a standalone question: a one-turn session (as an ad-hoc query)
            s = [{"role": "user", "content": s}]
        if isinstance(s, bytes) or not isinstance(s, Iterable):
            raise TypeError(
                f"{name}[{i}] must be a Session, a list of {{role, content}} messages or a "
                f"question string, got a {type(s).__name__}"
            )
        try:
            out.append(Session.from_messages(str(i), list(s)))
        except (KeyError, TypeError, AttributeError) as e:
            raise TypeError(
                f"{name}[{i}]: each message needs a role and a content ({e!r})"
            ) from None
        except ValueError as e:
            raise ValueError(f"{name}[{i}]: {e}") from None
        _check_turns(out[-1], f"{name}[{i}]")
    return out


def _check_turns(session: Session, where: str) -> None:
    for j, turn in enumerate(session.turns):
        check_unicode(turn.content, f"{where}.messages[{j}].content")


def passage_texts(items: Any, name: str = "passages") -> list[str]:
    """`passage_text` of every item of a batch; an error names the item at fault."""
    out = []
    for i, p in enumerate(batch(items, name, "passages")):
        if not isinstance(p, (str, Mapping)) and not isinstance(getattr(p, "text", None), str):
            raise TypeError(
                f"{name}[{i}] must be a Passage, a {{title?, text}} mapping or a string, "
                f"got a {type(p).__name__}"
            )
        try:
            text = passage_text(p)
        except ValueError as e:
            raise ValueError(f"{name}[{i}]: {e}") from None
        out.append(check_unicode(text, f"{name}[{i}]"))
    return out


def check_unicode(text: str, where: str) -> str:
    """`text` unless it holds a lone surrogate (JSON can carry "\\ud800"; no tokenizer takes
    it): then a ValueError naming `where` and the position."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{where}: a lone surrogate {text[e.start]!r} at character {e.start} is not text "
            "(a broken UTF-16 escape?)"
        ) from None
    return text


def rank_key(doc_id: str, score: float) -> tuple[float, str]:
    """Sort key of the TREC convention used everywhere here: (-score, docid)."""
    return (-score, doc_id)


@dataclass(frozen=True)
class Run:
    """Retrieval results: query id -> doc id -> score.

    Ranks are never stored; they follow from scores with ties broken by (-score, docid).
    """

    scores: Mapping[str, Mapping[str, float]]
    name: str = "chatretriever"

    def ranked(self, query_id: str) -> list[ScoredDoc]:
        """The documents of one query, best first, ties broken by doc id."""
        docs = self.scores.get(query_id, {})
        ordered = sorted(docs.items(), key=lambda kv: rank_key(kv[0], kv[1]))
        return [ScoredDoc(query_id, d, s) for d, s in ordered]

    @classmethod
    def from_scored(cls, docs: Iterable[ScoredDoc], name: str = "chatretriever") -> Run:
        scores: dict[str, dict[str, float]] = {}
        for d in docs:
            scores.setdefault(d.query_id, {})[d.doc_id] = float(d.score)
        return cls(scores=scores, name=name)


def qrels_to_dict(qrels: Iterable[Qrel]) -> dict[str, dict[str, int]]:
    """Qrels as query id -> doc id -> relevance (the shape evaluators take)."""
    out: dict[str, dict[str, int]] = {}
    for q in qrels:
        out.setdefault(q.query_id, {})[q.doc_id] = q.relevance
    return out
