"""What a file given in the wrong place holds: a reader's first-line error says it by name.

A corpus reader given a sessions file fails on its first line with "field 'text': missing
field", a qrels reader given a run with "expected 4 columns, got 6", a conversation reader given
DSTC knowledge with "none of the conversation formats known": true, and no help. When a reader
fails on the first line, `wrong_kind` tells the file's format (`formats.guess_format`, and the
knowledge formats of `grounding.knowledge_format`) and, when it is another known kind, returns
the error that names it and the command that reads it.

The readers import this module inside their error path only (it imports them).
"""

from __future__ import annotations

from pathlib import Path

from chatretriever.errors import DataFormatError
from chatretriever.io.formats import guess_format
from chatretriever.io.grounding import knowledge_format

# what each reader takes (any other told kind is the wrong kind)
CORPUS_KINDS = ("beir-corpus", "beir-queries", "queries-tsv")
QRELS_KINDS = ("trec-qrels", "beir-qrels")
RUN_KINDS = ("trec-run",)
KNOWLEDGE_KINDS = ("dstc-knowledge", "ikat-passages", "doc2dial-docs")

# what reads each kind of file, for the message
_READ_BY = {
    **dict.fromkeys(
        KNOWLEDGE_KINDS, "`chatretriever data corpus FILE --out corpus.jsonl` writes it as a corpus"
    ),
    **dict.fromkeys(QRELS_KINDS, "`evaluate RUN QRELS` takes it second"),
    **dict.fromkeys(RUN_KINDS, "`evaluate RUN QRELS` takes it first"),
    "sessions": "`--sessions` reads it",
}
_CONVERSATIONS = "`--sessions` reads it; `data convert` writes it as sessions JSONL"


def told_kind(path: str | Path) -> str | None:
    """The format of a file as far as it can be told from its first bytes (None: not told).

    Args:
        path: The file.

    Returns:
        One of `formats.FORMAT_NAMES` or `KNOWLEDGE_KINDS`, or None.
    """
    try:
        kind = knowledge_format(path)
    except DataFormatError:
        kind = None  # a conversation, qrels or run file: guess_format names it
    if kind in KNOWLEDGE_KINDS:
        return kind
    try:
        return guess_format(path)
    except (DataFormatError, OSError):
        return None


def wrong_kind(path: str | Path, wanted: str, accepted: tuple[str, ...]) -> DataFormatError | None:
    """The error for a file of another known kind than a reader takes, else None.

    Args:
        path: The file the reader failed on.
        wanted: What the reader takes, for people ("a corpus", "qrels", "a run").
        accepted: The told kinds the reader takes: a file told as one of them keeps the
            reader's own error (its line and field).

    Returns:
        A DataFormatError naming what the file holds and what reads it, or None.
    """
    kind = told_kind(path)
    if kind is None or kind in accepted:
        return None
    return kind_error(path, kind, wanted)


def kind_error(path: str | Path, kind: str, wanted: str) -> DataFormatError:
    """The error saying that `path` holds `kind` data, not `wanted`, and what reads it."""
    read_by = _READ_BY.get(kind, _CONVERSATIONS if kind not in CORPUS_KINDS else "")
    return DataFormatError(
        path, f"holds {kind} data, not {wanted}" + (f" ({read_by})" if read_by else "")
    )


def first_line_error(
    path: str | Path, error: DataFormatError, wanted: str, accepted: tuple[str, ...]
) -> DataFormatError:
    """`error` itself unless it is on the file's first lines (1, or 2 after a header) or about
    the whole file, and the file is of another known kind: then the error naming that kind
    (`wrong_kind`)."""
    if error.line is not None and error.line > 2:
        return error
    return wrong_kind(path, wanted, accepted) or error
