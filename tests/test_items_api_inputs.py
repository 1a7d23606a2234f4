"""ItemRecommender inputs: an empty catalog, mapping items, and the noun its replies use."""

from __future__ import annotations

import pytest
from fakes import HashEncoder

from chatretriever.methods.items.recommend import ItemRecommender
from chatretriever.types import Passage

BOOKS = [
    {"id": "b1", "title": "Dune", "text": "title: Dune, tags: space, epic", "tags": ["Space"]},
    {"id": "b2", "title": "Emma", "text": "title: Emma, tags: romance", "tags": ["Romance"]},
]
GAMES = [
    Passage("1", "title: Hades, tags: roguelike", "Hades", {"game_details": ["Single-player"]}),
    Passage("2", "title: Doom, tags: shooter", "Doom", {"game_details": ["Single-player"]}),
]


def test_an_empty_catalog_is_refused_at_construction():
    with pytest.raises(ValueError, match="items: the catalog is empty"):
        ItemRecommender(HashEncoder(), [])
    with pytest.raises(TypeError, match=r"items must be a list of .*got a dict: wrap one"):
        ItemRecommender(HashEncoder(), BOOKS[0])


def test_mapping_items_are_read_as_catalog_lines():
    rec = ItemRecommender(HashEncoder(), BOOKS, lambda m: "Read Dune: epic space.", top_k=2)
    assert all(isinstance(p, Passage) for p in rec.items)
    assert rec.items[0] == Passage("b1", BOOKS[0]["text"], "Dune", {"tags": ["Space"]})
    out = rec.respond("an epic in space")
    assert not out.fell_back and [p.id for p in out.named] == ["b1"]
    # no "text": rendered from the other fields, as a `read_catalog` line
    bare = ItemRecommender(HashEncoder(), [{"id": "x", "title": "Go", "tags": ["Board"]}])
    assert bare.items[0].text == "title: Go, tags: Board"
    nested = ItemRecommender(HashEncoder(), [{"id": "x", "title": "Go", "metadata": {"a": 1}}])
    assert nested.items[0].metadata == {"a": 1}


def test_a_bad_item_is_named():
    with pytest.raises(ValueError, match=r"items\[1\] has no 'title' field"):
        ItemRecommender(HashEncoder(), [BOOKS[0], {"id": "b3", "text": "x"}])
    with pytest.raises(TypeError, match=r"items\[0\]: Passage.id must be a string, got int"):
        ItemRecommender(HashEncoder(), [{"id": 1, "title": "A"}])
    with pytest.raises(TypeError, match=r"items\[0\] must be a Passage or a mapping, got a str"):
        ItemRecommender(HashEncoder(), ["Dune"])


def test_the_reply_names_what_the_catalog_holds():
    books = ItemRecommender(HashEncoder(), BOOKS).respond("romance")
    assert books.fell_back and books.text.startswith("Here are items that fit")
    games = ItemRecommender(HashEncoder(), GAMES).respond("roguelike")  # Steam's fields
    assert games.text.startswith("Here are games that fit")
    prompts = []
    rec = ItemRecommender(HashEncoder(), BOOKS, lambda m: prompts.append(m) or "", noun="books")
    assert rec.respond("romance").text.startswith("Here are books that fit")
    assert "Candidate books:" in prompts[0][0]["content"]
    assert "game" not in prompts[0][0]["content"]
