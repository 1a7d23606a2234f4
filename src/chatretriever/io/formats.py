"""Tell a dataset file's format from its name and first bytes (`guess_format`).

`data stats` counts each format (`stats`); the conversation readers dispatch on it
(`conversations.read_conversations`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from chatretriever.errors import DataFormatError
from chatretriever.io.cast_txt import looks_like_cast_txt
from chatretriever.io.corpus import tsv_header
from chatretriever.io.files import iter_lines, open_text, undecodable_error
from chatretriever.io.topiocqa import is_qrecc

# every format `guess_format` names (`stats.FORMATS` counts each)
FORMAT_NAMES = (
    "beir-corpus",
    "beir-queries",
    "sessions",
    "trec-qrels",
    "beir-qrels",
    "trec-run",
    "mtrag",
    "cast-topics",
    "cast-topics-txt",
    "queries-tsv",
    "ikat-topics",
    "dstc11-logs",
    "topiocqa",
    "qrecc",
    "orquac",
    "doc2dial",
    "wow",
    "canard",
    "esconv",
    "multiesc",
    "esconv-tsv",
    "strategy-list",
    "reclm-items",
    "reclm-sequences",
)

_HEAD_CHARS = 1 << 16
_JSON_KEY = re.compile(r'"([^"\\]+)"\s*:')


class UnknownFormatError(DataFormatError):
    """A readable file whose format `guess_format` cannot tell."""


def read_head(path: Path) -> str:
    """The first 64 KiB of a file's text (what format guessing reads); errors name the file."""
    with open_text(path) as f:
        try:
            return f.read(_HEAD_CHARS)
        except UnicodeDecodeError as e:
            raise undecodable_error(path, e) from None
        except (EOFError, OSError) as e:
            raise DataFormatError(path, f"cannot read file: {e}") from None


def _guess_json_document(path: Path, head: str) -> str | None:
    keys = set(_JSON_KEY.findall(head))
    if "QuAC_dialog_id" in keys:
        return "canard"
    if "Conversation_no" in keys:
        return "qrecc" if is_qrecc(keys) else "topiocqa"
    if "ptkb" in keys or ({"turns", "turn_id"} <= keys and "utterance" in keys):
        return "ikat-topics"
    if "turn" in keys and keys & {"raw_utterance", "utterance"}:
        return "cast-topics"
    if "chosen_topic" in keys and "dialog" in keys:
        return "wow"
    if "dialog" in keys and "content" in keys:  # Wizard of Wikipedia's dialogs have `text`
        return "esconv"
    if {"speaker", "text"} <= keys:
        return "dstc11-logs"
    if not keys and re.match(r'\[\s*"', head):
        return "strategy-list"
    return None


# a file name that says it holds passages
_PASSAGES = re.compile(r"collection|corpus|psgs|passage")


def _guess_json_lines(path: Path) -> str | None:
    first = next((line for _, line in iter_lines(path)), "")
    try:
        keys = set(json.loads(first))
    except (json.JSONDecodeError, TypeError):
        return None
    if {"conversation_id", "task_id", "input"} <= keys:
        return "mtrag"
    if {"qid", "question", "history"} <= keys:
        return "orquac"
    if "messages" in keys:
        return "sessions"
    if "item_id" in keys:
        return "reclm-items"
    if "dialog" in keys:
        return "multiesc"
    if "text" in keys and keys & {"_id", "id"}:
        # corpora and queries share {"_id", "text"}: passages carry a title, queries do not,
        # and MTRAG's conversational queries mark their turns
        name = path.name.lower()
        named = re.search(r"(?<![a-z])quer(?:y|ies)(?![a-z])", name) and not _PASSAGES.search(name)
        if "title" not in keys and (named or "|user|:" in first):
            return "beir-queries"
        return "beir-corpus"
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _guess_text(path: Path, first: str) -> str | None:
    cols, tabs = first.split(), first.split("\t")
    if " EOS " in first:
        return "esconv-tsv"
    if len(tabs) == 3 and (tabs[0].strip().lower() in ("query-id", "qid") or _is_number(tabs[2])):
        return "beir-qrels"
    if len(tabs) >= 2 and tsv_header(tabs) is not None:
        return "beir-corpus"  # a TSV corpus named by its header (DPR's id, text, title)
    if len(tabs) == 2:  # queries, or a passage collection (MS MARCO's collection.tsv)
        passages = _PASSAGES.search(path.name.lower())
        return "beir-corpus" if passages or len(tabs[1].split()) > 40 else "queries-tsv"
    if "sequential" in path.name.lower():
        return "reclm-sequences"
    if len(cols) == 6 and _is_number(cols[3]) and _is_number(cols[4]):
        return "trec-run"
    if len(cols) == 4 and cols[1] in ("0", "Q0") and _is_number(cols[3]):
        return "trec-qrels"
    if len(cols) >= 2 and all(c.isdigit() for c in cols[1:]):
        return "reclm-sequences"
    return None


def guess_format(path: str | Path) -> str:
    """Tell a dataset file's format (one of `FORMAT_NAMES`) from its name and first bytes.

    Raises:
        DataFormatError: The file is missing, empty (and not a qrels file) or unrecognised.
    """
    path = Path(path)
    if path.is_dir():
        raise DataFormatError(path, "is a directory; give one of its files")
    head = read_head(path).lstrip()
    fmt: str | None
    if not head:
        fmt = "trec-qrels" if "qrel" in path.name.lower() else None
    elif head.startswith("["):
        fmt = _guess_json_document(path, head)
    elif head.startswith("{"):
        fmt = "doc2dial" if re.match(r'\{\s*"dial_data"\s*:', head) else _guess_json_lines(path)
    elif looks_like_cast_txt(head):
        fmt = "cast-topics-txt"
    else:
        fmt = _guess_text(path, head.splitlines()[0])
    if fmt is None:
        raise UnknownFormatError(
            path, f"cannot tell the format; pass one of {', '.join(FORMAT_NAMES)}"
        )
    return fmt
