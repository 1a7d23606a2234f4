"""TopiOCQA (McGill-NLP): open-domain conversational QA with topic switches.

A file (`topiocqa_{train,dev}.json[.gz]`) is one JSON list of turns::

    {"Conversation_no": 1, "Turn_no": 2, "Question": "...", "Answer": "...",
     "Context": ["q1", "a1"],  # earlier questions and answers, alternating
     "Topic": "...", "Topic_section": "...", "is_nq": false}

No passages ship with it here: each turn is a session -> response pair.

QReCC (apple/ml-qrecc, `qrecc_{train,test}.json`) has the same layout without topics and with
the human rewrite of each question (`Rewrite`, kept as `Session.rewrite`), `Answer_URL` and
`Conversation_source`: this reader reads both (`is_qrecc` tells them apart).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.files import read_json
from chatretriever.types import Session, Turn

_CORE = ("Conversation_no", "Turn_no", "Question", "Answer", "Context", "Rewrite")
_RENAMED = {
    "Topic": "topic",
    "Topic_section": "topic_section",
    "Answer_URL": "answer_url",
    "Conversation_source": "conversation_source",
}
QRECC_KEYS = frozenset({"Rewrite", "Conversation_source", "Answer_URL"})
"""Keys only QReCC's turns carry."""


def is_qrecc(keys: Collection[str]) -> bool:
    """Whether a turn record with these keys is QReCC's rather than TopiOCQA's."""
    return bool(QRECC_KEYS & set(keys))


def _field(obj: Mapping[str, Any], key: str, kind: type, path: Path, where: str) -> Any:
    if key not in obj:
        raise DataFormatError(path, "missing field", None, f"{where}.{key}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        msg = f"expected {kind.__name__}, got {type(value).__name__}"
        raise DataFormatError(path, msg, None, f"{where}.{key}")
    return value


def topiocqa_session(
    obj: Mapping[str, Any], path: str | Path = "<input>", index: int = 0
) -> Session:
    """One TopiOCQA turn as a Session (id `{Conversation_no}_{Turn_no}`).

    Args:
        obj: The turn record.
        path: File it came from (for error messages).
        index: Its 0-based position in the file's list (errors name it as `[index].field`).

    Returns:
        The session: `Context` as alternating user/assistant turns, then `Question`;
        `response` = `Answer`; `rewrite` = QReCC's `Rewrite`; metadata `conversation`, `turn` and
        the other fields (`topic`, `topic_section`, `is_nq`; QReCC's `answer_url`, ...).
    """
    path, where = Path(path), f"[{index}]"
    conv = _field(obj, "Conversation_no", int, path, where)
    turn = _field(obj, "Turn_no", int, path, where)
    question = _field(obj, "Question", str, path, where)
    answer = _field(obj, "Answer", str, path, where)
    context = _field(obj, "Context", list, path, where)
    if len(context) % 2:
        msg = f"expected alternating questions and answers, got {len(context)} items"
        raise DataFormatError(path, msg, None, f"{where}.Context")
    if not all(isinstance(c, str) for c in context):
        raise DataFormatError(path, "expected a list of strings", None, f"{where}.Context")
    rewrite = obj.get("Rewrite")
    if rewrite is not None and not isinstance(rewrite, str):
        msg = f"expected str, got {type(rewrite).__name__}"
        raise DataFormatError(path, msg, None, f"{where}.Rewrite")
    history = [Turn("user" if i % 2 == 0 else "assistant", c) for i, c in enumerate(context)]
    meta = {"conversation": conv, "turn": turn}
    meta.update({_RENAMED.get(k, k): v for k, v in obj.items() if k not in _CORE})
    return Session(
        id=f"{conv}_{turn}",
        turns=(*history, Turn("user", question)),
        response=answer if answer.strip() else None,  # QReCC leaves unanswered turns blank
        rewrite=(rewrite or "").strip() or None,
        metadata=meta,
    )


def iter_topiocqa(path: str | Path) -> Iterator[Session]:
    """Sessions of a TopiOCQA file in file order; duplicate (conversation, turn) pairs raise."""
    data = read_json(path)
    if not isinstance(data, list):
        raise DataFormatError(path, "expected a JSON list of turns")
    seen: set[str] = set()
    for i, obj in enumerate(data):
        if not isinstance(obj, Mapping):
            raise DataFormatError(path, "expected an object", None, f"[{i}]")
        s = topiocqa_session(obj, path, i)
        if s.id in seen:
            raise DataFormatError(path, f"duplicate id {s.id!r}", None, f"[{i}].Turn_no")
        seen.add(s.id)
        yield s


def read_topiocqa(path: str | Path) -> list[Session]:
    """All sessions of a TopiOCQA file (see `iter_topiocqa`)."""
    return list(iter_topiocqa(path))
