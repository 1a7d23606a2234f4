"""Small helpers the tests share for writing inline fixture files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path


def write(path: Path, text: str) -> Path:
    """Write `text` to `path` (parents created), gzip-compressed when the name ends in .gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows) -> str:
    """Rows as JSON lines text."""
    return "".join(json.dumps(r) + "\n" for r in rows)


def pretend_missing(monkeypatch, *missing: str, all_others_installed: bool = False) -> None:
    """Makes importlib.metadata report `missing` (and, optionally, nothing else) as absent."""
    from importlib import metadata
    from types import SimpleNamespace

    real = metadata.distribution

    def distribution(name: str):
        if name in missing:
            raise metadata.PackageNotFoundError(name)
        return SimpleNamespace(version="1") if all_others_installed else real(name)

    monkeypatch.setattr(metadata, "distribution", distribution)


def next_token_logits(model, tokenizer, text: str):
    """The model's logits over `text`: (1, T, V)."""
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


DSTC11_LOGS = [  # two contexts of one DSTC11 track 5 dialogue
    [{"speaker": "U", "text": "I need a hotel in the north."}],
    [
        {"speaker": "U", "text": "I need a hotel in the north."},
        {"speaker": "S", "text": "Hobsons House is nice."},
        {"speaker": "U", "text": "Are its bathrooms clean?"},
    ],
]
DSTC11_LABELS = [  # their labels.json
    {"target": False},
    {
        "target": True,
        "knowledge": [
            {"domain": "hotel", "entity_id": 20, "doc_type": "review", "doc_id": 9, "sent_id": 4}
        ],
        "response": "Guests found the bathrooms spotless.",
    },
]


QRECC_TURNS = [  # two turns of one QReCC conversation (apple/ml-qrecc), the second unanswered
    {
        "Context": [],
        "Question": "what is x",
        "Rewrite": "what is x",
        "Answer": "A thing.",
        "Answer_URL": "http://x",
        "Conversation_no": 74,
        "Turn_no": 1,
        "Conversation_source": "trec",
    },
    {
        "Context": ["what is x", "A thing."],
        "Question": "is it big",
        "Rewrite": "is x big",
        "Answer": "",
        "Answer_URL": "",
        "Conversation_no": 74,
        "Turn_no": 2,
        "Conversation_source": "trec",
    },
]
