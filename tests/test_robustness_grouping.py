"""Grouping per-turn sessions into conversations when several open with the same questions."""

from __future__ import annotations

import random

from chatretriever.retrieval.robustness import conversations
from chatretriever.retrieval.robustness.conversations import group_conversations
from chatretriever.types import Session, Turn

HELLO = Turn("user", "How much is garage door opener repair?")
NEW = Turn("user", "And new?")


def shared_openings() -> list[Session]:
    """Four conversations opening with one question; a, b and z also ask the same second one."""
    cheap, depends = Turn("assistant", "100 dollars."), Turn("assistant", "It depends.")
    more = (Turn("assistant", "300."), Turn("user", "Fitted?"))
    sessions = [
        Session("a<::>1", (HELLO,)),
        Session("a<::>2", (HELLO, cheap, NEW)),
        Session("b<::>1", (HELLO,)),
        Session("b<::>2", (HELLO, depends, NEW)),
        Session("b<::>3", (HELLO, depends, NEW, *more)),
        Session("c<::>1", (HELLO,)),
        Session("z<::>2", (HELLO, cheap, NEW)),
    ]
    random.Random(0).shuffle(sessions)  # grouping must not rely on the input order
    return sessions


def test_shared_openings_are_grouped_by_responses_then_id_then_a_free_slot() -> None:
    convs = group_conversations(shared_openings())
    by_id = {c.id: [s.session.id for s in c.steps] for c in convs}
    assert by_id == {
        "b<::>3": ["b<::>1", "b<::>2", "b<::>3"],  # b<::>2 has b's responses: not a's or z's
        "a<::>2": ["a<::>1", "a<::>2"],  # the longest common id prefix wins the first slot
        "z<::>2": ["c<::>1", "z<::>2"],  # c ends after one turn: it takes the free slot left
    }
    assert all(s.task for c in convs for s in c.steps)  # every session kept its own slot
    z = next(c for c in convs if c.id == "z<::>2")
    assert z.steps[0].response == "100 dollars."  # the owner's response to the shared opening


def test_a_session_is_compared_only_with_conversations_opening_like_it(monkeypatch) -> None:
    calls = []

    def counted(s, owner):
        calls.append((s.id, owner.id))
        return match(s, owner)

    match = conversations._match
    monkeypatch.setattr(conversations, "_match", counted)
    sessions = []
    for c in range(50):  # distinct openings: each shorter session fits exactly one conversation
        turns: list[Turn] = []
        for t in range(3):
            turns.append(Turn("user", f"question {c}.{t}"))
            sessions.append(Session(f"c{c}<::>{t + 1}", tuple(turns)))
            turns.append(Turn("assistant", f"answer {c}.{t}"))
    convs = group_conversations(sessions)
    assert [c.id for c in convs] == [f"c{c}<::>3" for c in range(50)]
    # One comparison per session that is not a conversation's longest (was one per owner:
    # 2 x 50 x 50 here, quadratic in the number of sessions).
    assert len(calls) == 100
    assert all(s.split("<::>")[0] == o.split("<::>")[0] for s, o in calls)
