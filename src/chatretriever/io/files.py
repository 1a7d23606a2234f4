"""Streaming readers (gzip transparent) and atomic writers shared by every format."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from chatretriever.errors import DataFormatError


def open_text(path: str | Path) -> IO[str]:
    """Open a text file for reading; `.gz` files are decompressed on the fly."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(path, "file not found")
    if path.is_dir():
        raise DataFormatError(path, "is a directory; expected a file")
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
        return open(path, encoding="utf-8")
    except OSError as e:  # permissions, special files
        raise DataFormatError(path, f"cannot open file: {e.strerror or e}") from None


def iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without newline), skipping blank lines."""
    with open_text(path) as f:
        try:
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip("\n\r")
                if line.strip():
                    yield lineno, line
        except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, OSError) as e:
            raise DataFormatError(path, f"cannot read file: {e}") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each JSON line; a bad line raises DataFormatError."""
    for lineno, line in iter_lines(path):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, f"malformed JSON ({e.msg})", line=lineno) from None
        if not isinstance(obj, dict):
            raise DataFormatError(path, "expected a JSON object", line=lineno)
        yield lineno, obj


def read_json(path: str | Path) -> Any:
    """Load one whole JSON document (gzip transparent)."""
    with open_text(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, f"malformed JSON ({e.msg})", line=e.lineno) from None
        except (UnicodeDecodeError, EOFError, gzip.BadGzipFile, OSError) as e:
            raise DataFormatError(path, f"cannot read file: {e}") from None


def require(
    obj: Mapping[str, Any], key: str, path: str | Path, line: int | None, kind: type = str
) -> Any:
    """Return obj[key], or raise DataFormatError naming the file, line and field."""
    if key not in obj:
        raise DataFormatError(path, "missing field", line=line, field=key)
    value = obj[key]
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # numeric ids are common in BEIR files
    if not isinstance(value, kind):
        raise DataFormatError(
            path, f"expected {kind.__name__}, got {type(value).__name__}", line=line, field=key
        )
    return value


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write to a temporary file beside `path`, then rename it into place.

    Nothing is left at `path` if the body raises. `.gz` paths are gzip-compressed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # The stack closes the gzip layer before the raw file, also when the body raises,
        # so no half-closed writer is left for the garbage collector to flush.
        with contextlib.ExitStack() as stack:
            sink: IO[bytes] = stack.enter_context(os.fdopen(fd, "wb"))
            if path.suffix == ".gz":
                gz = gzip.GzipFile(fileobj=sink, mode="wb", mtime=0)
                sink = stack.enter_context(gz)  # type: ignore[arg-type]
            if "b" in mode:
                yield sink
            else:
                text = io.TextIOWrapper(sink, encoding="utf-8", newline="\n")
                try:
                    yield text
                finally:
                    text.detach()  # flushes; keeps `sink` open for the stack to close
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; written files should be readable like any
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(directory: str | Path) -> Iterator[Path]:
    """Fill a temporary directory beside `directory`, then swap it into place.

    An existing `directory` is replaced only once the body has finished; on error nothing changes.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield tmp
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_jsonl(path: str | Path, rows: Iterator[Mapping[str, Any]] | list) -> int:
    """Write dicts as JSON lines atomically; returns the number of rows."""
    n = 0
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
