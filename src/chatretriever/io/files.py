"""Streaming readers (gzip transparent), field checks and the JSONL writer shared by every format.

The atomic writers (`atomic_write`, `atomic_path`, `atomic_dir`, `atomic_files`, ...) are in
`io.atomic`.
"""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from chatretriever.errors import DataFormatError
from chatretriever.io.atomic import atomic_write


def open_text(path: str | Path) -> IO[str]:
    """Open a text file for reading; `.gz` files are decompressed on the fly."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(path, "file not found")
    if path.is_dir():
        raise DataFormatError(path, "is a directory; expected a file")
    try:
        # utf-8-sig: a byte-order mark at the start (Windows editors write one) is dropped
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig")
        return open(path, encoding="utf-8-sig")
    except OSError as e:  # permissions, special files
        raise DataFormatError(path, f"cannot open file: {e.strerror or e}") from None


def undecodable_error(path: Path, error: UnicodeDecodeError) -> DataFormatError:
    """The error of a file that is not UTF-8, naming the first line that is not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:  # type: ignore[operator]
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                byte = raw[e.start : e.start + 1].hex()
                msg = f"not UTF-8 text: byte 0x{byte} at column {e.start + 1} (save it as UTF-8)"
                return DataFormatError(path, msg, line=lineno)
    return DataFormatError(path, f"cannot read file: {error}")


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without newline), skipping blank lines."""
    with open_text(path) as f:
        try:
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip("\n\r")
                if line.strip():
                    yield lineno, line
        except UnicodeDecodeError as e:
            raise undecodable_error(Path(path), e) from None
        except (EOFError, gzip.BadGzipFile, OSError) as e:
            raise DataFormatError(path, f"cannot read file: {e}") from None


# a JSON escape of a UTF-16 surrogate that is not half of a pair (a high one not followed by a
# low one, a low one not after a high one): it decodes to a str that no encoder can write
_LONE_SURROGATE_ESCAPE = re.compile(
    r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"
    r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)


def _lone_surrogate(value: Any, where: str = "") -> tuple[str, str] | None:
    """(field path, character) of the first string in a JSON value holding a lone surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            return where or "(value)", value[e.start]
        return None
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, item in items:
        if isinstance(key, str) and (bad := _lone_surrogate(key)) is not None:
            return f"{where}.{_printable(key)}".lstrip(".") + " (its name)", bad[1]
        sub = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}".lstrip(".")
        sub = _printable(sub)
        found = _lone_surrogate(item, sub)
        if found is not None:
            return found
    return None


def _printable(text: str) -> str:
    """Text any stream can print: a lone surrogate as its escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_text(path: str | Path, raw: str, value: Any, line: int | None = None) -> None:
    """Refuse a JSON value that holds a lone surrogate (an invalid character)."""
    match = _LONE_SURROGATE_ESCAPE.search(raw)
    if match is None:
        return
    found = _lone_surrogate(value)  # None: the escape was text ("\\ud800" written out)
    if found is not None:
        field, char = found
        if line is None:
            line = raw.count("\n", 0, match.start()) + 1
        msg = f"holds an invalid character (a lone UTF-16 surrogate, {ascii(char)})"
        raise DataFormatError(path, msg, line=line, field=field)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each JSON line; a bad line raises DataFormatError (as does
    a string holding a lone surrogate escape, which nothing downstream could encode)."""
    for lineno, line in iter_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, f"malformed JSON ({e.msg})", line=lineno) from None
        if not isinstance(obj, dict):
            raise DataFormatError(path, "expected a JSON object", line=lineno)
        _check_text(path, line, obj, lineno)
        yield lineno, obj


def read_text(path: str | Path) -> str:
    """A whole text file (gzip transparent; a byte-order mark dropped).

    Raises:
        DataFormatError: missing, unreadable, or not UTF-8 (naming the first such line).
    """
    with open_text(path) as f:
        try:
            return f.read()
        except UnicodeDecodeError as e:
            raise undecodable_error(Path(path), e) from None
        except (EOFError, gzip.BadGzipFile, OSError) as e:
            raise DataFormatError(path, f"cannot read file: {e}") from None


def read_json(path: str | Path) -> Any:
    """Load one whole JSON document (gzip transparent)."""
    text = read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(path, f"malformed JSON ({e.msg})", line=e.lineno) from None
    _check_text(path, text, value)
    return value


_WHITESPACE = re.compile(r"\s")


def check_id(value: str, path: str | Path, line: int | None, field: str) -> str:
    """An id as TREC runs and qrels can hold it: non-empty, without whitespace."""
    if not value or _WHITESPACE.search(value):
        what = "empty id" if not value else f"id {value!r} contains whitespace"
        raise DataFormatError(
            path, f"{what}: TREC runs and qrels (space-separated) cannot hold it", line, field
        )
    return value


def require_id(obj: Mapping[str, Any], key: str, path: str | Path, line: int | None) -> str:
    """`require(obj, key)` checked by `check_id`; an integer id (common in BEIR files) is read as
    its digits, a float (1.5, NaN) is refused."""
    if isinstance(obj.get(key), float):
        msg = f"expected a string or integer id, got the number {obj[key]!r}"
        raise DataFormatError(path, msg, line=line, field=key)
    return check_id(require(obj, key, path, line), path, line, key)


def require(
    obj: Mapping[str, Any], key: str, path: str | Path, line: int | None, kind: type = str
) -> Any:
    """Return obj[key], or raise DataFormatError naming the file, line and field."""
    if key not in obj:
        raise DataFormatError(path, "missing field", line=line, field=key)
    value = obj[key]
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        if value != value or value in (float("inf"), float("-inf")):
            raise DataFormatError(path, f"expected str, got {value!r}", line=line, field=key)
        value = str(value)  # numbers where text is expected: BEIR files number their ids
    if not isinstance(value, kind):
        raise DataFormatError(
            path, f"expected {kind.__name__}, got {type(value).__name__}", line=line, field=key
        )
    return value


def write_jsonl(path: str | Path, rows: Iterator[Mapping[str, Any]] | list) -> int:
    """Write dicts as JSON lines atomically; returns the number of rows."""
    n = 0
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
