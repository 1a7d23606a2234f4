"""Atomic writers: a file, a directory or a set of files that appears whole or not at all.

Each writes beside its target, fsyncs what it wrote, renames it into place and fsyncs the
directory, so a crash or an exception leaves either the old version or the new one, never half of
one. Shared by every format and every saved artefact (indexes, models, run directories).
"""

from __future__ import annotations

import contextlib
import fnmatch
import gzip
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)


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
