"""TREC CAsT 2019's plain-text topics (`evaluation_topics_v1.0.txt`, `train_topics_v1.0.txt`).

Blocks of `Number: 31`, `Title: ...`, `Description: ...` and `N<TAB>utterance` lines, with blank
or `-----` lines between them; read into the sessions `chatretriever.io.cast` gives for the same
topics' JSON.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.cast import linear_sessions, with_sibling_rewrites
from chatretriever.io.files import check_id, iter_lines
from chatretriever.types import Session

_TXT_NUMBER = re.compile(r"Number:\s*\S+")
_TXT_FIELD = re.compile(r"(Number|Title|Description):(.*)")
_TXT_TURN = re.compile(r"(\d+) *\t(.*)")
_TXT_RULE = re.compile(r"-{3,}")


def looks_like_cast_txt(first_lines: str) -> bool:
    """Whether a text starts as CAsT 2019's plain-text topics (`Number: 31`, then its lines)."""
    lines = [line for line in first_lines.lstrip("\ufeff").splitlines() if line.strip()]
    if not lines or not _TXT_NUMBER.fullmatch(lines[0].strip()):
        return False
    return len(lines) == 1 or bool(_TXT_FIELD.match(lines[1]) or _TXT_TURN.match(lines[1]))


def _txt_field(
    topics: list[tuple[int, dict[str, Any]]], key: str, value: str, path: Path, lineno: int
) -> None:
    """Apply one `Number:` / `Title:` / `Description:` line."""
    if key == "Number":
        _check_txt_turns(topics, path)
        check_id(value, path, lineno, key)
        if any(t["number"] == value for _, t in topics):
            raise DataFormatError(path, f"duplicate topic {value!r}", lineno, key)
        topics.append((lineno, {"number": value, "turn": []}))
    elif not topics:
        raise DataFormatError(path, f"{key} before any 'Number:' line", lineno, key)
    elif key.lower() in topics[-1][1]:
        raise DataFormatError(path, f"a second {key} for one topic", lineno, key)
    else:
        topics[-1][1][key.lower()] = value


def _txt_turn(
    topics: list[tuple[int, dict[str, Any]]], number: str, text: str, path: Path, lineno: int
) -> None:
    """Apply one `N<TAB>utterance` line."""
    if not topics:
        raise DataFormatError(path, "a turn before any 'Number:' line", lineno)
    turns = topics[-1][1]["turn"]
    if any(t["number"] == number for t in turns):
        raise DataFormatError(path, f"duplicate turn {number!r}", lineno, "turn")
    if not text:
        raise DataFormatError(path, "empty utterance", lineno, "utterance")
    turns.append({"number": number, "raw_utterance": text})


def _check_txt_turns(topics: list[tuple[int, dict[str, Any]]], path: Path) -> None:
    if topics and not topics[-1][1]["turn"]:
        lineno, topic = topics[-1]
        raise DataFormatError(path, f"topic {topic['number']!r} has no turns", lineno, "Number")


def _read_txt(path: Path) -> list[dict[str, Any]]:
    """CAsT plain-text topics in the layout of the JSON topics (`number`, `title`, `turn`...)."""
    topics: list[tuple[int, dict[str, Any]]] = []
    for lineno, line in iter_lines(path):
        if field := _TXT_FIELD.match(line.lstrip("\ufeff")):
            _txt_field(topics, field[1], field[2].strip(), path, lineno)
        elif turn := _TXT_TURN.match(line):
            _txt_turn(topics, turn[1], turn[2].strip(), path, lineno)
        elif not _TXT_RULE.fullmatch(line.strip()):
            msg = "expected 'Number:', 'Title:', 'Description:', 'N<TAB>utterance' or '-----'"
            raise DataFormatError(path, msg, lineno)
    if not topics:
        raise DataFormatError(path, "no topics ('Number: ...' lines)")
    _check_txt_turns(topics, path)
    return [topic for _, topic in topics]


def read_cast_topics_txt(path: str | Path) -> list[Session]:
    """Read CAsT 2019's plain-text topics (`evaluation_topics_v1.0.txt`) into sessions.

    Blocks of `Number: 31`, `Title: ...`, `Description: ...` and `N<TAB>utterance` lines (blank
    or `-----` lines between them). Sessions as `read_cast_topics` gives for the JSON: id
    `{topic}_{turn}`, the earlier utterances as history, title and description in metadata, and
    rewrites from a `*resolved*.tsv` beside the file. Errors name the line.
    """
    path = Path(path)
    topics = _read_txt(path)
    sessions = [s for ti, t in enumerate(topics) for s, _ in linear_sessions(t, path, ti)]
    return with_sibling_rewrites(sessions, path)
