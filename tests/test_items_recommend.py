"""The conversational recommender (fake encoder, scripted and tiny LLMs, stdin-driven CLI), the
multi-turn requests, and the item CLI commands."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest
from fakes import HashEncoder
from test_items_fixtures import write_domain

from chatretriever.apps.registry import register_encoder, unregister_encoder
from chatretriever.cli import main
from chatretriever.methods.items.recommend import (
    ItemRecommender,
    multi_turn_requests,
    named_titles,
    session_vs_last_turn,
)
from chatretriever.types import Passage, Session, Turn

ITEMS = [
    Passage(
        "1", "title: Dungeon Pals, tags: co-op, roguelike", "Dungeon Pals", {"tags": ["Co-op"]}
    ),
    Passage("2", "title: Night Manor, tags: horror, puzzle", "Night Manor", {"tags": ["Horror"]}),
    Passage("3", "title: Farm Days, tags: casual, farming", "Farm Days", {"tags": ["Casual"]}),
    Passage("4", "title: Star Fleet, tags: space, strategy", "Star Fleet", {"tags": ["Space"]}),
]


def _recommender(reply: str | None, top_k: int = 2) -> ItemRecommender:
    chat = None if reply is None else (lambda messages: reply)
    return ItemRecommender(HashEncoder(), ITEMS, chat, top_k=top_k, max_picks=1)


def test_a_reply_naming_retrieved_items_is_kept():
    rec = _recommender("Try Dungeon Pals: a co-op roguelike.")
    out = rec.respond("a co-op roguelike")
    assert not out.fell_back and [p.id for p in out.named] == ["1"]
    assert out.text == "Try Dungeon Pals: a co-op roguelike."
    assert [t.role for t in rec.turns] == ["user", "assistant"]


def test_a_reply_naming_an_item_not_retrieved_falls_back_to_the_list():
    rec = _recommender("Play Farm Days!", top_k=1)  # not the top item for this request
    out = rec.respond("a co-op roguelike dungeon")
    assert "Farm Days" not in {p.title for p in out.retrieved}
    assert out.fell_back and out.named == out.retrieved[:1]
    assert out.text.startswith("Here are items") and "Farm Days" not in out.text  # toy catalog


def test_a_reply_naming_nothing_or_too_many_falls_back():
    assert _recommender("I like turtles").respond("co-op roguelike").fell_back
    both = _recommender("Dungeon Pals or Night Manor", top_k=4)
    assert both.respond("co-op horror").fell_back  # max_picks = 1


def test_the_conversation_so_far_is_embedded_and_reset_clears_it():
    class Recording(HashEncoder):
        seen: list = []

        def encode_sessions(self, sessions, batch_size=16, show_progress=False):
            self.seen.append([t.content for t in sessions[0].turns])
            return super().encode_sessions(sessions, batch_size, show_progress)

    enc = Recording()
    rec = ItemRecommender(enc, ITEMS, None)
    rec.respond("co-op")
    rec.respond("and roguelike")
    assert enc.seen[-1] == ["co-op", "and roguelike"]
    rec.reset()
    rec.respond("horror")
    assert enc.seen[-1] == ["horror"]


class _Ranked:
    """An encoder whose one query prefers item 1, then 3, then 2 (identity item vectors)."""

    name = "ranked"

    def encode_passages(self, passages, batch_size=64, show_progress=False):
        return np.eye(len(passages), dtype=np.float32)

    def encode_sessions(self, sessions, batch_size=64, show_progress=False):
        return np.array([[1.0, 0.1, 0.5]], dtype=np.float32)


PORTALS = [
    Passage("1", "title: Portal 2", "Portal 2", {"tags": ["Puzzle"]}),
    Passage("2", "title: Portal", "Portal", {"tags": ["Puzzle"]}),
    Passage("3", "title: Half-Life", "Half-Life", {"tags": ["FPS"]}),
]


@pytest.mark.parametrize("top_k", [2, 3])
def test_a_longer_title_is_not_a_mention_of_a_shorter_one_inside_it(top_k):
    rec = ItemRecommender(_Ranked(), PORTALS, lambda m: "Try Portal 2: a clever co-op puzzle.",
                          top_k=top_k)  # fmt: skip
    out = rec.respond("a puzzle game")  # top 2: Portal 2, Half-Life; top 3: all three
    assert not out.fell_back and [p.title for p in out.named] == ["Portal 2"]
    both = ItemRecommender(_Ranked(), PORTALS, lambda m: "Portal 2, or the first Portal.")
    assert [p.title for p in both.respond("puzzle").named] == ["Portal 2", "Portal"]


def test_named_titles_gives_each_span_to_the_longest_title():
    titles = ["10 second ninja x", "10 second ninja", "ninja"]
    assert named_titles("try 10 second ninja x!", titles) == {"10 second ninja x"}
    assert named_titles("10 second ninja, then ninja", titles) == {"10 second ninja", "ninja"}


@pytest.fixture
def fake_encoder():
    register_encoder("fake", lambda rest: HashEncoder())
    yield
    unregister_encoder("fake")


def test_recommend_cli_is_stdin_driven_with_a_tiny_llm(
    tmp_path, monkeypatch, capsys, fake_encoder, tiny_llama_dir
):
    root = write_domain(tmp_path / "steam")
    monkeypatch.setattr(sys, "stdin", io.StringIO("a puzzle game\n:reset\nstudio 3 rpg\n"))
    code = main(
        ["recommend", "--items", str(root), "--model", "fake:", "--llm", str(tiny_llama_dir)]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "(conversation reset)" in out
    # a random tiny LLM names no retrieved game: both turns fall back to the retrieved list
    assert out.count("Here are games that fit what you asked for:") == 2


def test_multi_turn_requests_reveal_constraints_over_turns():
    cons = [
        {"field": "tags", "op": "has", "value": "Indie"},
        {"field": "tags", "op": "has", "value": "RPG"},
        {"field": "developer", "op": "has", "value": "Studio 1"},
    ]
    fa = Session("f", (Turn("user", "q"),), metadata={"task": "FA2I", "constraints": cons})
    uq = Session(
        "u",
        (Turn("user", "q"),),
        metadata={"task": "UQ2I", "constraints": cons[:2], "exclude": ["1", "2"]},
    )
    one = Session("s", (Turn("user", "q"),), metadata={"task": "FA2I", "constraints": cons[:1]})
    convs = {c.id: c for c in multi_turn_requests([fa, uq, one], {"1": "A", "2": "B"})}
    assert set(convs) == {"f", "u"}  # a single constraint makes no conversation
    users = [t.content for t in convs["f"].turns if t.role == "user"]
    assert users == [
        "I'm looking for a game with tags: Indie.",
        "It should also have tags: RPG.",
        "It should also have developer: Studio 1.",
    ]
    assert [t.content for t in convs["u"].turns if t.role == "user"][0] == "I have played B, A."
    assert convs["u"].metadata["exclude"] == ["1", "2"]

    def rank(sessions, depth):  # item "9" only for queries that mention Indie
        return [[("9", 1.0)] if "Indie" in s.turns[-1].content else [("8", 1.0)] for s in sessions]

    res = session_vs_last_turn(rank, [convs["f"]], {"f": {"9": 1}})
    assert res == {"conversations": 1.0, "hit@5_session": 1.0, "hit@5_last_turn": 0.0}


def test_build_and_eval_items_cli(tmp_path, capsys):
    root = write_domain(tmp_path / "steam")
    out = tmp_path / "items"
    args = ["build-items", str(root), "--out", str(out), "--train-per-task", "3"]
    assert main([*args, "--test-per-task", "2", "--test-fraction", "0.3"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["catalog"] == 40
    assert main(["eval-items", str(out), "--model", "bm25", "--out", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| system | UH2I | I2I |") and "| bm25 |" in table
    res = json.loads((tmp_path / "r.json").read_text())
    assert set(res["tasks"]) <= set(counts["test"]) and "hit@5" in res["mean"]
    assert main(["build-items", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
