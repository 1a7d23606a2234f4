"""Conversations from per-turn sessions: the turn-by-turn view the online loop walks.

Datasets give one session per evaluated turn, each carrying its whole history. The partial
response modification walks a conversation turn by turn, so sessions are grouped: a session
belongs to a longer session whose user turns start with its own user turns (one session per turn
count; where several fit, the one that also has its responses, then the one whose id shares the
longest prefix), else it starts a conversation.
"""

from __future__ import annotations

import os
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
    # Longest first, so a conversation's owner exists before its shorter sessions. Each session
    # takes a free slot (its turn count) of an owner whose user turns it starts: two
    # conversations asking the same first questions must not share (and lose) a slot. The best
    # matches are placed first (`_match`), so "c2<::>1" goes to c2 rather than to c1. Owners are
    # found by their user-turn prefixes (`starts`), so a session is compared only with the
    # owners it can belong to, not with every conversation (quadratic in the sessions).
    longest: list[Session] = []
    members: list[dict[int, Session]] = []
    starts: dict[tuple[str, ...], list[int]] = {}  # user-turn prefix -> owners opening with it
    by_length: dict[int, list[Session]] = {}
    for s in sessions:
        by_length.setdefault(len(_user_turns(s)), []).append(s)
    for n in sorted(by_length, reverse=True):
        group = by_length[n]
        ranked = [
            (rank, i, k)
            for i, s in enumerate(group)
            for k in starts.get(_user_turns(s), ())
            if (rank := _match(s, longest[k])) is not None
        ]
        ranked.sort(key=lambda r: (not r[0][0], -r[0][1], r[1], r[2]))  # best first, then order
        placed: set[int] = set()
        for _, i, k in ranked:
            if i not in placed and n not in members[k]:
                members[k][n] = group[i]
                placed.add(i)
        for i, s in enumerate(group):
            if i not in placed:
                users = _user_turns(s)
                for j in range(len(users) + 1):  # () too: a session without user turns
                    starts.setdefault(users[:j], []).append(len(longest))
                longest.append(s)
                members.append({n: s})
    position = {id(s): i for i, s in enumerate(sessions)}
    first = [min(position[id(s)] for s in m.values()) for m in members]
    order = sorted(range(len(longest)), key=lambda k: first[k])
    return [_conversation(longest[k], members[k]) for k in order]


def _match(s: Session, owner: Session) -> tuple[bool, int] | None:
    """How well `s` fits as an earlier turn of `owner`: None when its user turns do not start
    the owner's; else (the owner also has its responses, length of their common id prefix)."""
    users = _user_turns(s)
    if _user_turns(owner)[: len(users)] != users:
        return None
    turns = [t for t in s.turns if t.role != "system"]
    same = [t for t in owner.turns if t.role != "system"][: len(turns)] == turns
    return same, len(os.path.commonprefix([s.id, owner.id]))


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
