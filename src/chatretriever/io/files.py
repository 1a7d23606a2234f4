"""Streaming readers (gzip transparent) and atomic writers shared by every format."""

from __future__ import annotations

import contextlib
import fnmatch
import gzip
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from chatretriever.errors import DataFormatError

logger = logging.getLogger(__name__)


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


def read_json(path: str | Path) -> Any:
    """Load one whole JSON document (gzip transparent)."""
    with open_text(path) as f:
        try:
            text = f.read()
        except UnicodeDecodeError as e:
            raise undecodable_error(Path(path), e) from None
        except (EOFError, gzip.BadGzipFile, OSError) as e:
            raise DataFormatError(path, f"cannot read file: {e}") from None
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


def _fsync(path: str | Path, must_open: bool) -> None:
    # Linux and macOS flush a file's data through any descriptor of it; where fsync needs a
    # writable handle (Windows) or a directory cannot be opened, this is best effort.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if must_open:
            raise
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str | Path) -> None:
    """Make a rename or a new entry in `directory` durable (best effort: not every platform or
    filesystem can fsync a directory, e.g. Windows cannot open one)."""
    _fsync(directory, must_open=False)


def _fsync_file(path: str | Path) -> None:
    _fsync(path, must_open=True)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under `root` (and `root`), so that a rename of `root` that
    follows can never expose unwritten data after a crash."""
    for parent, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                _fsync_file(path)
        fsync_dir(parent)


def _stream_to(target: Path) -> Iterator[Path]:
    """`atomic_path` for a device or a pipe: the body writes a temporary file, which is then
    copied into the target as a stream (a rename would replace the device with a file)."""
    fd, name = tempfile.mkstemp(prefix=".chatretriever.", suffix=f".tmp{target.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file name beside `path` for writers that want a name (savefig, np.save).

    The body writes the file; when it returns, the file is fsynced, renamed onto `path` and the
    directory fsynced. If the body raises, `path` is untouched and the temporary file removed.
    The temporary name keeps `path`'s suffix, so writers that infer a format from it still can.
    A device or a pipe (`/dev/stdout`, `/dev/null`) is written as a stream instead, never
    renamed over.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; give the path of a file to write")
    if path.exists() and not path.is_file():  # /dev/stdout, /dev/null, a pipe: never renamed over
        yield from _stream_to(path)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
        )
    except OSError as e:  # a parent that is a file, no permission: name the path asked for
        raise ValueError(f"{path}: cannot write here ({e.strerror or e})") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _fsync_file(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; written files should be readable like any
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write to a temporary file beside `path`, then fsync it and rename it into place.

    Nothing changes at `path` if the body raises. `.gz` paths are gzip-compressed.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        # The stack closes the gzip layer before the raw file, also when the body raises,
        # so no half-closed writer is left for the garbage collector to flush.
        with contextlib.ExitStack() as stack:
            sink: IO[bytes] = stack.enter_context(open(tmp, "wb"))
            if path.suffix == ".gz":
                # the header names the final file, not the random temporary one: the same
                # content gives the same bytes (mtime 0 for the same reason)
                name = path.name.removesuffix(".gz")
                gz = gzip.GzipFile(filename=name, fileobj=sink, mode="wb", mtime=0)
                sink = stack.enter_context(gz)  # type: ignore[arg-type]
            if "b" in mode:
                yield sink
            else:
                text = io.TextIOWrapper(sink, encoding="utf-8", newline="\n")
                try:
                    yield text
                finally:
                    text.detach()  # flushes; keeps `sink` open for the stack to close


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Move the finished directory `src` to `dst` (same filesystem), replacing any `dst`.

    `src` is fsynced first. An existing `dst` is moved aside, `src` renamed into place, and only
    then is the old copy deleted: `dst` is never deleted before its replacement is there (it is
    missing only between two renames). If the swap fails, the old `dst` is put back.
    """
    src, dst = Path(src), Path(dst)
    fsync_tree(src)
    if not os.path.lexists(dst):
        os.replace(src, dst)
        fsync_dir(dst.parent)
        return
    holder = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst.parent))
    old = holder / dst.name
    try:
        os.replace(dst, old)  # moved aside, not deleted
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(old, dst)
            raise
    except BaseException:
        holder.rmdir()
        raise
    fsync_dir(dst.parent)
    try:
        shutil.rmtree(holder)
    except OSError as e:  # the new copy is in place: a leftover old copy is only wasted space
        logger.warning("%s is replaced but its old copy %s could not be deleted: %s", dst, old, e)


@contextlib.contextmanager
def atomic_dir(directory: str | Path) -> Iterator[Path]:
    """Fill a temporary directory beside `directory`, then swap it into place (`replace_dir`).

    An existing `directory` is replaced only once the body has finished, and deleted only after
    the new one is in place; if the body or the swap raises, the old `directory` is left as it
    was and the temporary directory is removed.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        yield tmp
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_files(
    directory: str | Path, last: Sequence[str] = (), stale: Sequence[str] = ()
) -> Iterator[Path]:
    """Write a set of files into `directory` all at once, keeping its other entries.

    For a directory that also holds unrelated files (a training run's output dir holds the
    final model beside its checkpoints, recipe and log), where `atomic_dir` would delete them.
    The body fills a staging directory; when it returns, each entry it wrote replaces the
    same-named entry of `directory` (entries it did not write are kept), the `last` names after
    all others. The old versions of the `last` names are moved aside first, so a reader that
    checks for them never sees them beside half-replaced files. If the body raises, `directory`
    is untouched; if a rename fails, the old entries are put back. Only a crash during the
    renames themselves can leave a mix, then without the `last` entries and with the old copies
    in a `.<name>.*.old` directory inside `directory`. A missing `directory` appears whole,
    by one rename (merged into, as above, if another writer created it meanwhile).

    Args:
        directory: The target directory.
        last: Names (e.g. the file that marks the set as complete) moved in after the others.
        stale: Glob patterns of entries that belong to the set: those the body did not write
            (left by an earlier, different set) are removed with the old versions.

    Yields:
        The staging directory to write into.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    new = not directory.is_dir()
    where = directory.parent if new else directory
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=where))
    try:
        yield staging
        fsync_tree(staging)
        if new and _rename_unless_taken(staging, directory):
            return
        written = sorted(os.listdir(staging))
        final = [n for n in last if n in written]
        names = [n for n in written if n not in final] + final
        leftovers = [
            n
            for n in sorted(os.listdir(directory))
            if n not in written and any(fnmatch.fnmatchcase(n, pattern) for pattern in stale)
        ]
        _swap_entries(staging, directory, names, first_aside=final + leftovers)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _rename_unless_taken(src: Path, dst: Path) -> bool:
    """Rename the directory `src` to `dst` unless `dst` is a non-empty directory by now (then
    False: someone else made it; an empty one is replaced)."""
    try:
        os.rename(src, dst)  # POSIX refuses a non-empty target, Windows any existing one
    except OSError:
        if dst.is_dir():
            return False
        raise
    fsync_dir(dst.parent)
    return True


def _swap_entries(src: Path, dst: Path, names: Sequence[str], first_aside: Sequence[str]) -> None:
    """Move `names` from `src` into `dst`; the entries they replace and `first_aside` (moved
    first) are kept aside until all are in, then deleted; on failure they are put back."""
    holder = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".old", dir=dst))
    aside: list[str] = []
    placed: list[str] = []

    def move_aside(name: str) -> None:
        if os.path.lexists(dst / name) and name not in aside:
            os.replace(dst / name, holder / name)
            aside.append(name)

    try:
        for name in first_aside:
            move_aside(name)
        for name in names:
            move_aside(name)
            os.replace(src / name, dst / name)
            placed.append(name)
        fsync_dir(dst)
    except BaseException:
        for name in placed:  # undo: the new entries out, the old ones back
            _remove(dst / name)
        for name in aside:
            os.replace(holder / name, dst / name)
        shutil.rmtree(holder, ignore_errors=True)
        raise
    try:
        shutil.rmtree(holder)
    except OSError as e:
        logger.warning("%s: could not delete the replaced files in %s: %s", dst, holder, e)


def _remove(path: Path) -> None:
    """Delete a file, link or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_jsonl(path: str | Path, rows: Iterator[Mapping[str, Any]] | list) -> int:
    """Write dicts as JSON lines atomically; returns the number of rows."""
    n = 0
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
