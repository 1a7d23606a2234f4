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

Later years are read the same way: 2024's topics number topics with integers; 2025's name the
turn list `responses`, a turn's question `user_utterance`, its cited passages `citations` and its
PTKB statements `relevant_ptkbs` (and give `ptkb` as a list).
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
# field: its name in 2023/2024 topics, then in 2025's
_ALIASES = {
    "turns": ("turns", "responses"),
    "utterance": ("utterance", "user_utterance"),
    "response_provenance": ("response_provenance", "citations"),
    "ptkb_provenance": ("ptkb_provenance", "relevant_ptkbs"),
}


@dataclass
class IkatData:
    """Sessions of every turn and the cited passages by id (`{doc_id}:{passage_id}`)."""

    sessions: list[Session]
    passages: dict[str, Passage]


def _key(obj: Mapping[str, Any], key: str) -> str:
    """The name `key` has in this record (2025 renamed some fields; see `_ALIASES`)."""
    return next((k for k in _ALIASES.get(key, (key,)) if k in obj), key)


def _get(
    obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], path: Path, where: str
) -> Any:
    key = _key(obj, key)
    value = obj.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        got = "missing" if key not in obj else f"got {type(value).__name__}"
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataFormatError(path, f"expected {names} ({got})", None, f"{where}.{key}")
    return value


def _ptkb(raw: Any, path: Path, where: str) -> dict[str, str]:
    """The topic's personal statements by number: 2023/2024 give an object, 2025 a list
    (numbered from 1, as its `relevant_ptkbs` count)."""
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        pairs = {str(k): v for k, v in raw.items()}
    elif isinstance(raw, list):
        pairs = {str(i): v for i, v in enumerate(raw, start=1)}
    else:
        pairs = {"": None}
    if not all(isinstance(v, str) for v in pairs.values()):
        msg = "expected the statements as an object or a list of strings"
        raise DataFormatError(path, msg, None, f"{where}.ptkb")
    return pairs


def topic_sessions(topic: Mapping[str, Any], path: str | Path, index: int = 0) -> list[Session]:
    """The sessions of one topic tree, one per turn, in turn order.

    Args:
        topic: The topic record.
        path: File it came from (errors name it with `[index].field`).
        index: The topic's position in the file.

    Returns:
        Sessions with rewrite, response and metadata `conversation` (the topic number),
        `turn`, `title`, `passage_ids` (cited passages), `ptkb_provenance` and `ptkb` (the
        user's statements by number, which `ptkb_provenance` names).
    """
    path, where = Path(path), f"[{index}]"
    number = str(_get(topic, "number", (str, int), path, where))
    title = topic.get("title") or ""
    ptkb = _ptkb(topic.get("ptkb"), path, where)
    history: list[Turn] = []
    out = []
    for j, raw in enumerate(_get(topic, "turns", list, path, where)):
        at = f"{where}.{_key(topic, 'turns')}[{j}]"
        if not isinstance(raw, Mapping):
            raise DataFormatError(path, "expected an object", None, at)
        turn_id = _get(raw, "turn_id", int, path, at)
        utterance, rewrite, response = (
            _get(raw, k, str, path, at) for k in ("utterance", "resolved_utterance", "response")
        )
        cited = raw.get(_key(raw, "response_provenance")) or []
        if not isinstance(cited, list) or not all(isinstance(c, str) for c in cited):
            raise DataFormatError(
                path, "expected a list of strings", None, f"{at}.{_key(raw, 'response_provenance')}"
            )
        meta = {
            "conversation": number,
            "turn": turn_id,
            "title": title,
            "passage_ids": list(cited),
            "ptkb_provenance": list(raw.get(_key(raw, "ptkb_provenance")) or []),
            "ptkb": ptkb,
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


def load_ikat(
    directory: str | Path,
    splits: Sequence[str] | None = None,
    years: Sequence[int] = (2023,),
    need_passages: bool = True,
) -> IkatData:
    """Sessions and cited passages of the chosen splits and years of an iKAT data directory.

    Reads `{year}_{split}_topics.json` and its `{year}_{split}_topics_psg_text.jsonl` for every
    year and split present (2024 and 2025 publish only `test`); each split asked for must exist
    in at least one of the years (`splits=None`: every split found). The organisers published
    passage texts for 2023 only: with `need_passages=False` a missing passages file is skipped
    (the sessions' responses can still be positives).

    Raises:
        DataFormatError: a malformed file (named with its line or `[topic].field`), or a turn
            id repeated across the files read.
        FileNotFoundError: a split with no topics file in any of the years, or a topics file
            without its passages file.
    """
    directory = Path(directory)
    sessions: list[Session] = []
    passages: dict[str, Passage] = {}
    seen: dict[str, Path] = {}
    if splits is None:
        splits = [
            s for s in SPLITS if any((directory / f"{y}_{s}_topics.json").is_file() for y in years)
        ] or list(SPLITS)
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"iKAT split must be one of {SPLITS}, got {split!r}")
        found = [y for y in years if (directory / f"{y}_{split}_topics.json").is_file()]
        if not found:
            names = ", ".join(f"{y}_{split}_topics.json" for y in years)
            raise FileNotFoundError(f"{directory}: no iKAT {split} topics ({names})")
        for year in found:
            topics = directory / f"{year}_{split}_topics.json"
            texts = directory / f"{year}_{split}_topics_psg_text.jsonl"
            if not texts.is_file() and need_passages:
                raise FileNotFoundError(
                    f"{texts}: missing; the cited passages' texts of {topics.name} are needed "
                    "(iKAT published them for 2023 only; --positives answers trains on the "
                    "responses instead)"
                )
            for s in read_ikat_topics(topics):
                if s.id in seen:
                    raise DataFormatError(topics, f"turn {s.id!r} is also in {seen[s.id]}")
                seen[s.id] = topics
                sessions.append(s)
            if texts.is_file():
                passages.update(read_ikat_passages(texts))
    return IkatData(sessions, passages)
