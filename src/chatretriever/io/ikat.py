"""TREC iKAT 2023 (irlabamsterdam/iKAT): personalised conversational search topics.

`2023_{train,test}_topics.json` is a list of topic trees::

    {"number": "1-1", "title": "...", "ptkb": {"1": "I live in ..."},
     "turns": [{"turn_id": 1, "utterance": "...", "resolved_utterance": "...",  # human rewrite
                "response": "...", "ptkb_provenance": [2],
                "response_provenance": ["clueweb22-...:3"]}]}               # cited passages

`2023_{train,test}_topics_psg_text.jsonl` holds the cited passages' texts:
`{"doc_id", "passage_id", "passage_text"}`; a passage's id is `{doc_id}:{passage_id}`, as in
`response_provenance`. Each turn becomes a Session (id `{number}_{turn_id}`): the earlier
utterances and responses of its topic, then its utterance; rewrite = `resolved_utterance`,
response = `response`. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.files import iter_jsonl, read_json
from chatretriever.types import Passage, Session, Turn

SPLITS = ("train", "test")
_TURN = ("turn_id", "utterance", "resolved_utterance", "response")


@dataclass
class IkatData:
    """Sessions of every turn and the cited passages by id (`{doc_id}:{passage_id}`)."""

    sessions: list[Session]
    passages: dict[str, Passage]


def _get(obj: Mapping[str, Any], key: str, kind: type, path: Path, where: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        got = "missing" if key not in obj else f"got {type(value).__name__}"
        raise DataFormatError(path, f"expected {kind.__name__} ({got})", None, f"{where}.{key}")
    return value


def topic_sessions(topic: Mapping[str, Any], path: str | Path, index: int = 0) -> list[Session]:
    """The sessions of one topic tree, one per turn, in turn order.

    Args:
        topic: The topic record.
        path: File it came from (errors name it with `[index].field`).
        index: The topic's position in the file.

    Returns:
        Sessions with rewrite, response and metadata `conversation` (the topic number),
        `turn`, `title`, `passage_ids` (cited passages), `ptkb_provenance`.
    """
    path, where = Path(path), f"[{index}]"
    number = str(_get(topic, "number", str, path, where))
    title = topic.get("title") or ""
    history: list[Turn] = []
    out = []
    for j, raw in enumerate(_get(topic, "turns", list, path, where)):
        at = f"{where}.turns[{j}]"
        if not isinstance(raw, Mapping):
            raise DataFormatError(path, "expected an object", None, at)
        turn_id = _get(raw, "turn_id", int, path, at)
        utterance, rewrite, response = (_get(raw, k, str, path, at) for k in _TURN[1:])
        cited = raw.get("response_provenance") or []
        if not isinstance(cited, list) or not all(isinstance(c, str) for c in cited):
            raise DataFormatError(
                path, "expected a list of strings", None, f"{at}.response_provenance"
            )
        meta = {
            "conversation": number,
            "turn": turn_id,
            "title": title,
            "passage_ids": list(cited),
            "ptkb_provenance": list(raw.get("ptkb_provenance") or []),
        }
        turns = (*history, Turn("user", utterance))
        out.append(Session(f"{number}_{turn_id}", turns, rewrite, response, meta))
        history += [Turn("user", utterance), Turn("assistant", response)]
    return out


def read_ikat_topics(path: str | Path) -> list[Session]:
    """Every turn of a topics file as a Session (see `topic_sessions`); duplicate ids raise."""
    data = read_json(path)
    if not isinstance(data, list):
        raise DataFormatError(path, "expected a JSON list of topics")
    out: list[Session] = []
    seen: set[str] = set()
    for i, topic in enumerate(data):
        if not isinstance(topic, Mapping):
            raise DataFormatError(path, "expected an object", None, f"[{i}]")
        for s in topic_sessions(topic, path, i):
            if s.id in seen:
                raise DataFormatError(path, f"duplicate turn {s.id!r}", None, f"[{i}].number")
            seen.add(s.id)
            out.append(s)
    return out


def read_ikat_passages(path: str | Path) -> dict[str, Passage]:
    """The cited passages of a `*_psg_text.jsonl` file by `{doc_id}:{passage_id}`."""
    out: dict[str, Passage] = {}
    for lineno, obj in iter_jsonl(path):
        doc, part = obj.get("doc_id"), obj.get("passage_id")
        text = obj.get("passage_text")
        for name, value in (("doc_id", doc), ("passage_text", text)):
            if not isinstance(value, str):
                raise DataFormatError(path, "expected a string", lineno, name)
        if not isinstance(part, (str, int)) or isinstance(part, bool):
            raise DataFormatError(path, "expected a string or integer", lineno, "passage_id")
        pid = f"{doc}:{part}"
        out[pid] = Passage(pid, " ".join(text.split()), metadata={"doc_id": doc})
    return out


def load_ikat(directory: str | Path, splits: Sequence[str] = SPLITS) -> IkatData:
    """Sessions and cited passages of the chosen splits of an `ikat-2023/` directory.

    Raises:
        DataFormatError: a malformed file (named with its line or `[topic].field`).
        FileNotFoundError: a split's files are missing.
    """
    directory = Path(directory)
    sessions: list[Session] = []
    passages: dict[str, Passage] = {}
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"iKAT split must be one of {SPLITS}, got {split!r}")
        sessions += read_ikat_topics(directory / f"2023_{split}_topics.json")
        passages.update(read_ikat_passages(directory / f"2023_{split}_topics_psg_text.jsonl"))
    return IkatData(sessions, passages)
