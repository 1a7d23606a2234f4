"""Any conversation dataset the toolkit reads, as Sessions: what `--sessions` accepts.

`search`, `rewrite`, `answer`, `rerank`, `robustness` and `data convert` take the sessions JSONL
(`chatretriever.io.sessions`) or any of these files as they are published, the format told from
the file (`chatretriever.io.stats.guess_format`) or named:

| format | file | one session per |
|---|---|---|
| `sessions` | sessions JSONL | line |
| `mtrag` | MTRAG `reference.jsonl` (id = `task_id`) | task |
| `topiocqa` | TopiOCQA `*.json` (id = `{Conversation_no}_{Turn_no}`) | turn |
| `cast-topics` | TREC CAsT topics (id = `{topic}_{turn}`) | turn |
| `ikat-topics` | TREC iKAT 2023/2024/2025 topics (id = `{number}_{turn_id}`) | turn |
| `dstc11-logs` | DSTC11 track 5 `logs.json` (+ its `labels.json`; id = `{dir}-{i}`) | context |
| `esconv`, `multiesc` | ESConv / MultiESC dialogs | supporter turn after a seeker turn |

Session ids are the ones the datasets' qrels use, so a run scores against them directly.
Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from chatretriever.errors import DataFormatError
from chatretriever.io.cast import read_cast_topics
from chatretriever.io.dstc11 import read_dialogues
from chatretriever.io.esconv import dialogs_sessions, iter_multiesc, read_esconv
from chatretriever.io.ikat import read_ikat_topics
from chatretriever.io.mtrag import iter_mtrag_tasks
from chatretriever.io.sessions import read_sessions
from chatretriever.io.stats import guess_format
from chatretriever.io.topiocqa import read_topiocqa
from chatretriever.types import Session


def _dstc11(path: Path) -> list[Session]:
    labels = path.with_name("labels.json")
    return read_dialogues(path, labels if labels.is_file() else None, path.parent.name or "logs")


_READERS: dict[str, Callable[[Path], list[Session]]] = {
    "sessions": read_sessions,
    "mtrag": lambda p: list(iter_mtrag_tasks(p)),
    "topiocqa": read_topiocqa,
    "cast-topics": read_cast_topics,
    "ikat-topics": read_ikat_topics,
    "dstc11-logs": _dstc11,
    "esconv": lambda p: dialogs_sessions(read_esconv(p)),
    "multiesc": lambda p: dialogs_sessions(iter_multiesc(p)),
}
SESSION_FORMATS = tuple(_READERS)


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
    fmt = fmt or guess_format(path)
    if fmt not in _READERS:
        raise DataFormatError(
            path, f"holds {fmt}, not conversations; give one of: {', '.join(_READERS)}"
        )
    return _READERS[fmt](path)
