"""Any conversation dataset the toolkit reads, as Sessions: what `--sessions` accepts.

`search`, `rewrite`, `answer`, `rerank`, `robustness` and `data convert` take the sessions JSONL
(`chatretriever.io.sessions`) or any of these files as they are published, the format told from
the file (`chatretriever.io.formats.guess_format`) or named:

| format | file | one session per |
|---|---|---|
| `sessions` | sessions JSONL | line |
| `mtrag` | MTRAG `reference.jsonl` (id = `task_id`) | task |
| `topiocqa` | TopiOCQA `*.json` (id = `{Conversation_no}_{Turn_no}`) | turn |
| `orquac` | OR-QuAC preprocessed `{train,dev,test}.txt` JSON lines (id = `qid`) | line |
| `canard` | CANARD `*.json` (id = OR-QuAC's `{QuAC_dialog_id}_q#{Question_no - 1}`) | question |
| `doc2dial` | Doc2Dial / MultiDoc2Dial `*_dial_*.json` (id `{dial_id}_{turn_id}`) | answered turn |
| `wow` | Wizard of Wikipedia `*.json` (id `{dialogue}_{turn}`) | wizard turn after apprentice |
| `qrecc` | QReCC `qrecc_*.json` (id as TopiOCQA's; `Rewrite` is the rewrite) | turn |
| `cast-topics` | TREC CAsT topics JSON, 2022 trees too (id = `{topic}_{turn}`) | user turn |
| `cast-topics-txt` | TREC CAsT 2019 plain-text topics (id = `{topic}_{turn}`) | turn |
| `ikat-topics` | TREC iKAT 2023/2024/2025 topics (id = `{number}_{turn_id}`) | turn |
| `dstc11-logs` | DSTC11 track 5 `logs.json` (+ its `labels.json`; id = `{dir}-{i}`) | context |
| `esconv`, `multiesc` | ESConv / MultiESC dialogs | supporter turn after a seeker turn |
| `beir-queries` | BEIR queries JSONL `{"_id", "text"}` (MTRAG's `retrieval_tasks/*.jsonl`) | line |
| `queries-tsv` | `qid<TAB>text` (a queries TSV, CAsT 2019's rewrites) | line |

Session ids are the ones the datasets' qrels use, so a run scores against them directly. A query
text that marks its turns as MTRAG's retrieval tasks do (lines opening with `|user|:` or
`|agent|:`) becomes those turns; any other text is one user turn. `guess_format` calls a file of
`{"_id", "text"}` lines queries when its name says so or its turns are marked, else a corpus; given
as conversations, either is read as queries (unless its lines carry a `title`: then it is a
corpus, refused).
Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from chatretriever.errors import DataFormatError
from chatretriever.io.cast import read_cast_topics
from chatretriever.io.cast_txt import read_cast_topics_txt
from chatretriever.io.dstc11 import read_logs
from chatretriever.io.esconv import dialogs_sessions, iter_multiesc, read_esconv
from chatretriever.io.files import (
    check_id,
    iter_jsonl,
    iter_lines,
    open_text,
    require,
    require_id,
)
from chatretriever.io.formats import UnknownFormatError, guess_format
from chatretriever.io.grounded_dialogs import read_doc2dial, read_wow
from chatretriever.io.ikat import read_ikat_topics
from chatretriever.io.mtrag import iter_mtrag_tasks
from chatretriever.io.quac import read_canard, read_orquac
from chatretriever.io.sessions import read_sessions
from chatretriever.io.topiocqa import read_topiocqa
from chatretriever.types import Session, Turn

_MARKERS = {"|user|:": "user", "|agent|:": "assistant", "|assistant|:": "assistant"}


def query_turns(text: str) -> tuple[Turn, ...]:
    """The turns of a flattened query (`|user|: ...` / `|agent|: ...` lines), else one user turn.

    Lines without a marker continue the turn above them. Raises ValueError when the text is
    empty or its last marked turn is not the user's.
    """
    turns: list[list[str]] = []
    for line in text.splitlines():
        head = line.lstrip()
        marker = next((m for m in _MARKERS if head.startswith(m)), None)
        if marker is not None:
            turns.append([_MARKERS[marker], head[len(marker) :].strip()])
        elif turns:
            turns[-1][1] = f"{turns[-1][1]}\n{line}".strip()
    if not turns:
        if not text.strip():
            raise ValueError("empty query text")
        return (Turn("user", text.strip()),)
    if turns[-1][0] != "user":
        raise ValueError("the last marked turn must be the user's")
    return tuple(Turn(role, content) for role, content in turns)


def _query(qid: str, text: str, path: Path, line: int, field: str) -> Session:
    try:
        return Session(qid, query_turns(text))
    except ValueError as e:
        raise DataFormatError(path, str(e), line, field) from None


def read_beir_queries(path: str | Path) -> list[Session]:
    """BEIR queries JSONL (`{"_id", "text"}` per line) as sessions; duplicate ids raise."""
    out: dict[str, Session] = {}
    for lineno, obj in iter_jsonl(path):
        qid, text = require_id(obj, "_id", path, lineno), require(obj, "text", path, lineno)
        if qid in out:
            raise DataFormatError(path, f"duplicate id {qid!r}", lineno, "_id")
        out[qid] = _query(qid, text, Path(path), lineno, "text")
    return list(out.values())


_TSV_HEADER = ({"qid", "query_id", "query-id", "queryid", "id"}, {"query", "text", "question"})


def read_queries_tsv(path: str | Path) -> list[Session]:
    """`qid<TAB>text` lines as sessions (the text split as `query_turns`); duplicate ids raise.
    A header line (`query_id<TAB>query`, `qid<TAB>text`, ...) is skipped."""
    out: dict[str, Session] = {}
    for lineno, line in iter_lines(path):
        qid, tab, text = line.partition("\t")
        qid = qid.strip()
        ids, texts = _TSV_HEADER
        if lineno == 1 and qid.lower() in ids and text.strip().lower() in texts:
            continue
        if not tab or not qid:
            raise DataFormatError(path, "expected 'id<TAB>text'", lineno)
        check_id(qid, path, lineno, "id")
        if qid in out:
            raise DataFormatError(path, f"duplicate id {qid!r}", lineno, "id")
        out[qid] = _query(qid, text, Path(path), lineno, "text")
    return list(out.values())


def _sessions_or_unknown(path: Path) -> list[Session]:
    """A file no format was told from: sessions JSONL if it may be one (its reader then names
    the line and field at fault), else an error naming the formats that can be given."""
    name_it = f"name it (one of {', '.join(_READERS)})"
    from chatretriever.io.kinds import KNOWLEDGE_KINDS, kind_error, told_kind

    kind = told_kind(path)
    if kind in KNOWLEDGE_KINDS:  # DSTC knowledge, iKAT passages, Doc2Dial documents
        raise kind_error(path, kind, "conversations")
    first = next((line for _, line in iter_lines(path)), "")
    if first.strip() and not first.lstrip().startswith("{"):
        raise DataFormatError(path, f"cannot tell its conversation format; {name_it}")
    try:
        obj = json.loads(first) if first.strip() else None
    except json.JSONDecodeError:
        obj = None
        if _is_json_document(path):  # pretty-printed JSON, not JSON lines
            msg = f"a JSON document in none of the conversation formats known; {name_it}"
            raise DataFormatError(path, msg) from None
    if isinstance(obj, dict) and not obj.keys() & {"id", "messages"}:
        keys = ", ".join(sorted(obj)[:6])
        msg = f"cannot tell its conversation format (first line's keys: {keys}); {name_it}"
        raise DataFormatError(path, msg)
    sessions = read_sessions(path)
    if not sessions:
        raise DataFormatError(path, "holds no sessions")
    return sessions


def _is_json_document(path: Path) -> bool:
    try:
        with open_text(path) as f:
            json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return False
    return True


def _first_keys(path: Path) -> set[str]:
    return next((set(obj) for _, obj in iter_jsonl(path)), set())


_READERS: dict[str, Callable[[Path], list[Session]]] = {
    "sessions": read_sessions,
    "mtrag": lambda p: list(iter_mtrag_tasks(p)),
    "topiocqa": read_topiocqa,
    "qrecc": read_topiocqa,
    "orquac": read_orquac,
    "doc2dial": read_doc2dial,
    "wow": read_wow,
    "canard": read_canard,
    "cast-topics": read_cast_topics,
    "cast-topics-txt": read_cast_topics_txt,
    "ikat-topics": read_ikat_topics,
    "dstc11-logs": read_logs,
    "esconv": lambda p: dialogs_sessions(read_esconv(p)),
    "multiesc": lambda p: dialogs_sessions(iter_multiesc(p)),
    "beir-queries": read_beir_queries,
    "queries-tsv": read_queries_tsv,
}
SESSION_FORMATS = tuple(_READERS)
# what `guess_format` calls a file that, given as conversations, holds queries
_AS_QUERIES = {"beir-corpus": "beir-queries"}


def read_conversations(path: str | Path, fmt: str | None = None) -> list[Session]:
    """The sessions of a conversation file in any of `SESSION_FORMATS`.

    Args:
        path: The file (`.gz` read transparently).
        fmt: Its format; told from the file when None.

    Raises:
        DataFormatError: The file is malformed (named with its line or field), its format cannot
            be told, or it holds something other than conversations (a corpus, qrels, ...).
        ValueError: `fmt` is not one of `SESSION_FORMATS`.
    """
    path = Path(path)
    if fmt is not None and fmt not in _READERS:
        raise ValueError(f"unknown sessions format {fmt!r}; choose from {', '.join(_READERS)}")
    if fmt is None:
        try:
            guessed = guess_format(path)
        except UnknownFormatError:
            return _sessions_or_unknown(path)
        fmt = _AS_QUERIES.get(guessed, guessed)
        if guessed == "beir-corpus":
            first = next((line for _, line in iter_lines(path)), "")
            if "\t" in first and not first.lstrip().startswith("{"):
                fmt = "queries-tsv"  # id<TAB>text as conversations: long queries, not passages
            elif "title" in _first_keys(path):
                fmt = guessed  # passages, not queries: refused below
    if fmt not in _READERS:
        raise DataFormatError(
            path, f"holds {fmt}, not conversations; give one of: {', '.join(_READERS)}"
        )
    return _READERS[fmt](path)
