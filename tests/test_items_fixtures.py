"""A small inline RecLM-emb domain for the item tests: 40 games and 30 user histories."""

from __future__ import annotations

import json
from pathlib import Path

from chatretriever.io.reclm import RecLMData, UserHistory
from chatretriever.types import Passage

TAGS = ["Action", "Puzzle", "Indie", "RPG", "Horror", "Co-op", "Roguelike", "Strategy"]
GENRES = ["Action", "Adventure", "Indie", "Casual"]
WORDS = ["Dark", "Star", "Pixel", "Iron", "Lost", "Neon", "Quiet", "Red", "Sky", "Stone"]


def records() -> list[dict]:
    """40 item records in the RecLM-emb schema (deterministic)."""
    out = []
    for i in range(40):
        out.append(
            {
                "item_id": str(1000 + i),
                "title": f"{WORDS[i % 10]} {WORDS[(i * 3 + 1) % 10]} {i}",
                "tags": [TAGS[(i + j) % 8] for j in range(1 + i % 4)],
                "genres": [GENRES[i % 4], GENRES[(i + 1) % 4]],
                "game_details": ["Single-player"] + (["Multi-player"] if i % 3 == 0 else []),
                "developer": f"Studio {i % 5}",
                "publisher": f"Pub {i % 3}",
                "price": "Free to Play" if i % 7 == 0 else round(0.99 + 2.5 * (i % 9), 2),
                "release_date": f"{2010 + i % 10}-{1 + i % 12:02d}-{1 + i % 28:02d}",
                "sentiment": None,
                "early_access": False,
            }
        )
    return out


def histories() -> list[str]:
    """30 `user item item ...` lines over the 40 items (1-based rows)."""
    lines = []
    for u in range(30):
        n = 3 + u % 4
        items = [1 + (u * 7 + j * 5) % 40 for j in range(n)]
        items = list(dict.fromkeys(items))
        lines.append(" ".join([f"u{u}", *map(str, items)]))
    return lines


def write_domain(root: Path) -> Path:
    """metadata.jsonl + sequential_data.txt under root."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records()) + "\n")
    (root / "sequential_data.txt").write_text("\n".join(histories()) + "\n")
    return root


def domain() -> RecLMData:
    """The same domain in memory (as `io.reclm.load_reclm` reads it)."""
    items = []
    for row, r in enumerate(records(), start=1):
        meta = {k: v for k, v in r.items() if k != "title"}
        items.append(Passage(id=str(row), text=r["title"], title=r["title"], metadata=meta))
    hist = []
    for line in histories():
        user, *its = line.split()
        hist.append(UserHistory(user, tuple(its)))
    return RecLMData(items=items, histories=hist)
