"""Conversations from per-turn sessions: the turn-by-turn view the online loop walks.

Datasets give one session per evaluated turn, each carrying its whole history. The partial
response modification walks a conversation turn by turn, so sessions are grouped: a session
belongs to the longest session whose user turns start with its own user turns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from chatretriever.types import Session, Turn


@dataclass(frozen=True)
class Step:
    """One user turn of a conversation.

    Attributes:
        question: The user's question as the dataset has it.
        response: The dataset's response to it ("" when the dataset has none).
        session: The dataset's session ending at this question (its original history).
        task: True when this turn is one of the given sessions (evaluated); else it is only
            history of a later one.
    """

    question: str
    response: str
    session: Session
    task: bool


@dataclass(frozen=True)
class Conversation:
    """The steps of one conversation, oldest first."""

    id: str
    steps: tuple[Step, ...]


def _user_turns(s: Session) -> tuple[str, ...]:
    return tuple(t.content for t in s.turns if t.role == "user")


def group_conversations(sessions: Sequence[Session]) -> list[Conversation]:
    """Group per-turn sessions into conversations (named after their longest session).

    Args:
        sessions: One session per evaluated turn, each with its full history.

    Returns:
        Conversations in the order of their first session; each has one step per user turn of
        its longest session, and the steps that are given sessions are marked as tasks.
    """
    longest: list[Session] = []
    for s in sorted(sessions, key=lambda s: -len(_user_turns(s))):
        users = _user_turns(s)
        if not any(_user_turns(c)[: len(users)] == users for c in longest):
            longest.append(s)
    members: dict[str, dict[int, Session]] = {c.id: {} for c in longest}
    for s in sessions:
        users = _user_turns(s)
        owner = next(c for c in longest if _user_turns(c)[: len(users)] == users)
        members[owner.id][len(users)] = s
    position = {id(s): i for i, s in enumerate(sessions)}
    first = {owner: min(position[id(s)] for s in m.values()) for owner, m in members.items()}
    return [_conversation(c, members[c.id]) for c in sorted(longest, key=lambda c: first[c.id])]


def _conversation(longest: Session, tasks: dict[int, Session]) -> Conversation:
    turns = [t for t in longest.turns if t.role != "system"]
    steps = []
    for i, t in enumerate(turns):
        if t.role != "user":
            continue
        n = sum(1 for u in turns[: i + 1] if u.role == "user")
        nxt = turns[i + 1] if i + 1 < len(turns) and turns[i + 1].role == "assistant" else None
        session = tasks.get(n) or Session(id=f"{longest.id}#turn{n}", turns=tuple(turns[: i + 1]))
        response = nxt.content if nxt else (session.response or "")
        steps.append(Step(t.content, response, session, n in tasks))
    return Conversation(longest.id, tuple(steps))


def with_history(session: Session, history: Sequence[Turn], question: str) -> Session:
    """The session with another history and question (same id, rewrite and metadata)."""
    return Session(
        id=session.id,
        turns=(*history, Turn("user", question)),
        rewrite=session.rewrite,
        response=session.response,
        metadata=dict(session.metadata),
    )
