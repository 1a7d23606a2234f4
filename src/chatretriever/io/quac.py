"""Conversational search sets grown from QuAC: OR-QuAC and CANARD.

OR-QuAC (prdwb/orconvqa-release, `preprocessed/{train,dev,test}.txt`) is JSON lines::

    {"qid": "C_..._q#1", "question": "...", "rewrite": "...",  # CANARD's human rewrite
     "history": [{"question": "...", "answer": {"text": "..."}}], "answer": {"text": "..."}, ...}

Its qrels (`qrels.txt`) are one JSON object by qid, its passages `all_blocks.txt` BEIR-like
JSONL (`{"id", "title", "text"}`): both read by the corpus and qrels readers.

CANARD (`{train,dev,test}.json`) is a JSON list of `{"History": [title, section, q1, a1, ...],
"QuAC_dialog_id", "Question_no", "Question", "Rewrite"}`; a question's id is
`{QuAC_dialog_id}_q#{Question_no - 1}`, the OR-QuAC qid of the same question.

One Session per question: the earlier questions and answers (as the dataset shows them,
`CANNOTANSWER` included), then the question; rewrite = the human rewrite; response = the answer
(OR-QuAC; `CANNOTANSWER` is no answer).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError
from chatretriever.io.files import check_id, iter_jsonl, read_json, require
from chatretriever.types import Session, Turn

_NO_ANSWER = "CANNOTANSWER"


def _answer(raw: Any, path: Path, line: int | None, field: str) -> str | None:
    """An OR-QuAC answer object's text (None when there is none or QuAC could not answer)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or not isinstance(raw.get("text"), str):
        raise DataFormatError(path, "expected an answer object with a text", line, field)
    text = raw["text"].strip()
    return None if not text or text == _NO_ANSWER else text


def read_orquac(path: str | Path) -> list[Session]:
    """OR-QuAC's preprocessed JSON lines as sessions (id = `qid`); duplicate qids raise."""
    path = Path(path)
    out: dict[str, Session] = {}
    for lineno, obj in iter_jsonl(path):
        qid = check_id(require(obj, "qid", path, lineno), path, lineno, "qid")
        if qid in out:
            raise DataFormatError(path, f"duplicate qid {qid!r}", lineno, "qid")
        history = require(obj, "history", path, lineno, list)
        turns: list[Turn] = []
        for i, h in enumerate(history):
            where = f"history[{i}]"
            if not isinstance(h, Mapping) or not isinstance(h.get("question"), str):
                raise DataFormatError(path, "expected {question, answer}", lineno, where)
            turns.append(Turn("user", h["question"]))
            _answer(h.get("answer"), path, lineno, f"{where}.answer")  # checked
            shown = ((h.get("answer") or {}).get("text") or "").strip()
            if shown:  # as the dataset shows it, CANNOTANSWER included
                turns.append(Turn("assistant", shown))
        question = require(obj, "question", path, lineno)
        if not question.strip():
            raise DataFormatError(path, "empty question", lineno, "question")
        rewrite = obj.get("rewrite")
        if rewrite is not None and not isinstance(rewrite, str):
            raise DataFormatError(path, "expected a string", lineno, "rewrite")
        out[qid] = Session(
            qid,
            (*turns, Turn("user", question)),
            rewrite=(rewrite or "").strip() or None,
            response=_answer(obj.get("answer"), path, lineno, "answer"),
            metadata={"conversation": qid.rsplit("_q#", 1)[0]},
        )
    return list(out.values())


def _text(obj: Mapping[str, Any], key: str, path: Path, field: str) -> str:
    """obj[key] as a non-empty string, else an error naming `field` (`[i].Question`)."""
    value = obj.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        got = "missing" if key not in obj else f"got {value!r}"
        raise DataFormatError(path, f"expected a non-empty string ({got})", None, field)
    return value


def _canard_session(obj: Any, path: Path, i: int) -> Session:
    where = f"[{i}]"
    if not isinstance(obj, Mapping):
        raise DataFormatError(path, "expected an object", None, where)
    history = obj.get("History")
    if not isinstance(history, list) or not all(isinstance(h, str) for h in history):
        raise DataFormatError(path, "expected a list of strings", None, f"{where}.History")
    if len(history) < 2 or len(history) % 2:
        msg = f"expected the title, the section, then questions and answers; got {len(history)}"
        raise DataFormatError(path, msg, None, f"{where}.History")
    number = obj.get("Question_no")
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        raise DataFormatError(path, "expected a number from 1", None, f"{where}.Question_no")
    dialog, question, rewrite = (
        _text(obj, k, path, f"{where}.{k}") for k in ("QuAC_dialog_id", "Question", "Rewrite")
    )
    sid = check_id(f"{dialog}_q#{number - 1}", path, None, f"{where}.QuAC_dialog_id")
    turns = [Turn("user" if j % 2 == 0 else "assistant", h) for j, h in enumerate(history[2:])]
    meta = {"conversation": dialog, "title": history[0], "section": history[1]}
    return Session(
        sid, (*turns, Turn("user", question)), rewrite=rewrite.strip() or None, metadata=meta
    )


def read_canard(path: str | Path) -> list[Session]:
    """CANARD's JSON list as sessions (id = the OR-QuAC qid); duplicate ids raise."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataFormatError(path, "expected a JSON list of questions")
    out: dict[str, Session] = {}
    for i, obj in enumerate(data):
        s = _canard_session(obj, path, i)
        if s.id in out:
            raise DataFormatError(path, f"duplicate id {s.id!r}", None, f"[{i}].Question_no")
        out[s.id] = s
    return list(out.values())
