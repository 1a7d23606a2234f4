"""Sessions JSONL: `{"id", "messages": [{"role", "content"}], "rewrite"?, "response"?, ...}`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.files import iter_jsonl, require_id, write_jsonl
from chatretriever.types import ROLES, Session, Turn

_CORE = ("id", "messages", "rewrite", "response", "metadata")


def parse_messages(
    raw: Any, path: str | Path, line: int | None, field: str = "messages"
) -> tuple[Turn, ...]:
    """Validate a list of `{"role", "content"}` dicts; errors name the message index."""
    if not isinstance(raw, list) or not raw:
        raise DataFormatError(path, "expected a non-empty list of messages", line, field)
    turns = []
    for i, m in enumerate(raw):
        where = f"{field}[{i}]"
        if not isinstance(m, Mapping):
            raise DataFormatError(path, "expected an object", line, where)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataFormatError(path, f"role must be one of {ROLES}, got {role!r}", line, where)
        if not isinstance(content, str):
            raise DataFormatError(path, "content must be a string", line, where)
        turns.append(Turn(role, content))
    if turns[-1].role != "user":
        raise DataFormatError(path, "the last message must be the user's question", line, field)
    return tuple(turns)


def session_from_dict(
    obj: Mapping[str, Any], path: str | Path = "<input>", line: int | None = None
) -> Session:
    """Parse one session object (the JSONL schema above)."""
    sid = require_id(obj, "id", path, line)
    turns = parse_messages(obj.get("messages"), path, line)
    if not turns[-1].content.strip():  # nothing to search, rewrite or answer for
        where = f"messages[{len(turns) - 1}]"
        raise DataFormatError(path, "the current question (the last message) is empty", line, where)
    raw_meta = obj.get("metadata") or {}
    if not isinstance(raw_meta, Mapping):
        raise DataFormatError(path, "expected an object", line, "metadata")
    meta = dict(raw_meta)
    meta.update({k: v for k, v in obj.items() if k not in _CORE})
    for key in ("rewrite", "response"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise DataFormatError(path, f"expected str, got {type(obj[key]).__name__}", line, key)
    return Session(
        id=sid,
        turns=turns,
        rewrite=obj.get("rewrite"),
        response=obj.get("response"),
        metadata=meta,
    )


def session_to_dict(s: Session) -> dict[str, Any]:
    out: dict[str, Any] = {"id": s.id, "messages": s.messages()}
    if s.rewrite is not None:
        out["rewrite"] = s.rewrite
    if s.response is not None:
        out["response"] = s.response
    if s.metadata:
        out["metadata"] = dict(s.metadata)
    return out


def iter_sessions(path: str | Path) -> Iterator[Session]:
    """Stream sessions from a JSONL file; duplicate ids raise."""
    seen: set[str] = set()
    for lineno, obj in iter_jsonl(path):
        s = session_from_dict(obj, path, lineno)
        if s.id in seen:
            raise DataFormatError(path, f"duplicate id {s.id!r}", line=lineno, field="id")
        seen.add(s.id)
        yield s


def read_sessions(path: str | Path) -> list[Session]:
    return list(iter_sessions(path))


def write_sessions(path: str | Path, sessions: Iterable[Session]) -> int:
    """Write sessions as JSONL atomically; returns the count."""
    return write_jsonl(path, (session_to_dict(s) for s in sessions))
