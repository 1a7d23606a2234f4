"""Where a Milvus index lives: a local milvus-lite database file or a Milvus server URI.

A URI ending in `.db` is a local milvus-lite database (the CLI's default: `DIR/milvus.db`). An
index descriptor stores it relative to its directory when it was given relative or lies beside it
(`stored_uri`), and loading resolves it from there (`resolve_uri`), so an index directory moves
with its database. Any other URI (`http://host:19530`) names a Milvus server and is kept
unchanged. The same client code talks to both (`connect`; tested on milvus-lite only).

A Milvus error becomes one line (`connect`, `milvus_errors`): pymilvus and milvus-lite log the
error with its traceback before raising it, so those records are dropped while the line that
carries their message is raised. milvus-lite allows one process per database file (it holds a
lock on it): a second process gets a line saying so.

Torch-free; `pymilvus` (and `milvus-lite` for local files) are imported when used.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from chatretriever.errors import DataFormatError, require_extra

# Loggers that log a Milvus error with its traceback before it is raised (pymilvus's RPC errors,
# milvus-lite's failed server start, milvus-lite's gRPC servicer)
_ERROR_LOGGERS = (
    "pymilvus.decorators",
    "milvus_lite.server_manager",
    "milvus_lite.adapter.grpc.servicer",
)


class _DropErrors(logging.Filter):
    """Drops (and keeps, in `dropped`) ERROR records: the error they log is raised as one line."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        self.dropped.append(record)
        return False


@contextmanager
def _quiet_milvus_logs() -> Iterator[list[logging.LogRecord]]:
    """While inside, Milvus's ERROR log records are dropped; yields the list that keeps them."""
    hush = _DropErrors()
    loggers = [logging.getLogger(name) for name in _ERROR_LOGGERS]
    for lg in loggers:
        lg.addFilter(hush)
    try:
        yield hush.dropped
    finally:
        for lg in loggers:
            lg.removeFilter(hush)


def milvus_message(error: BaseException) -> str:
    """A Milvus error's text on one line (a `MilvusException`'s message, else `str`)."""
    return " ".join(str(getattr(error, "message", None) or error).split())


@contextmanager
def milvus_errors(where: str | Path, action: str) -> Iterator[None]:
    """Raise a Milvus error inside as one line naming `where`, without Milvus's logged traceback.

    Args:
        where: What the line names first (an index directory, a URI).
        action: What failed, e.g. "load the collection 'c' at idx/milvus.db".

    Raises:
        DataFormatError: "WHERE: Milvus could not ACTION: MESSAGE".
    """
    from pymilvus import MilvusException

    with _quiet_milvus_logs():
        try:
            yield
        except MilvusException as e:
            msg = f"Milvus could not {action}: {milvus_message(e)}"
            raise DataFormatError(where, msg) from None


def is_local(uri: str) -> bool:
    """Whether `uri` is a milvus-lite database file (pymilvus's rule: it ends with `.db`)."""
    return uri.endswith(".db") and not re.match(r"^[a-z]+://", uri)


def connect(uri: str) -> Any:
    """A `pymilvus.MilvusClient` for a server URI or a local `.db` file (its folder is made).

    Raises:
        MissingExtraError: pymilvus (or, for a local file, milvus-lite) is not installed.
        ValueError: It cannot be opened, e.g. a local file another process has open.
    """
    pymilvus = require_extra("pymilvus", "milvus", "the Milvus index")
    if is_local(uri):
        require_extra("milvus_lite", "milvus", "a local Milvus database (milvus-lite)")
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    with _quiet_milvus_logs() as dropped:
        try:
            return pymilvus.MilvusClient(uri=uri)
        except pymilvus.MilvusException as e:
            causes = [r.exc_info[1] for r in dropped if r.exc_info and r.exc_info[1]]
            raise ValueError(_open_failure(uri, causes[-1] if causes else e)) from None


def _open_failure(uri: str, cause: BaseException) -> str:
    """The line that says why `uri` could not be opened (`cause`: what milvus-lite logged)."""
    if not is_local(uri):
        return f"cannot connect to the Milvus server {uri}: {milvus_message(cause)}"
    if _locked_elsewhere(cause):
        return (
            f"the milvus-lite database {uri} is open in another process (a running "
            "`chatretriever serve`?): milvus-lite allows one process per file; stop that "
            "process, or keep the index on a Milvus server (index --backend milvus --uri "
            "http://host:19530)"
        )
    return f"cannot open the milvus-lite database {uri}: {milvus_message(cause)}"


def _locked_elsewhere(cause: BaseException) -> bool:
    """Whether milvus-lite failed because another process holds its database file's lock."""
    try:
        from milvus_lite.exceptions import DataDirLockedError
    except ImportError:  # a milvus-lite without it: the generic line
        return False
    return isinstance(cause, DataDirLockedError)


def stored_uri(uri: str, directory: str | Path) -> str:
    """The URI as a descriptor in `directory` records it.

    Args:
        uri: The URI the index was built with.
        directory: The descriptor's directory.

    Returns:
        A local file relative to `directory` when given relative or when it lies under
        `directory`'s parent (the descriptor moves with it), else `uri` unchanged.
    """
    if not is_local(uri):
        return uri
    path, base = os.path.abspath(uri), os.path.abspath(directory)
    within = os.path.commonpath([path, os.path.dirname(base)]) == os.path.dirname(base)
    return os.path.relpath(path, base) if within or not os.path.isabs(uri) else uri


def resolve_uri(uri: str, directory: str | Path) -> str:
    """The URI a descriptor's recorded `uri` names (the inverse of `stored_uri`).

    Args:
        uri: The URI as the descriptor records it.
        directory: The descriptor's directory.

    Returns:
        A relative local file joined to `directory` (normalised), else `uri` unchanged.
    """
    if not is_local(uri) or os.path.isabs(uri):
        return uri
    return os.path.normpath(os.path.join(directory, uri))
