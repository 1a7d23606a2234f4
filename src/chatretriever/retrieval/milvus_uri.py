"""Where a Milvus index lives: a local milvus-lite database file or a Milvus server URI.

A URI ending in `.db` is a local milvus-lite database (the CLI's default: `DIR/milvus.db`). An
index descriptor stores it relative to its directory when it was given relative or lies beside it
(`stored_uri`), and loading resolves it from there (`resolve_uri`), so an index directory moves
with its database. Any other URI (`http://host:19530`) names a Milvus server and is kept
unchanged. The same client code talks to both (`connect`; tested on milvus-lite only).

Torch-free; `pymilvus` (and `milvus-lite` for local files) are imported by `connect` only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from chatretriever.errors import require_extra


def is_local(uri: str) -> bool:
    """Whether `uri` is a milvus-lite database file (pymilvus's rule: it ends with `.db`)."""
    return uri.endswith(".db") and not re.match(r"^[a-z]+://", uri)


def connect(uri: str) -> Any:
    """A `pymilvus.MilvusClient` for a server URI or a local `.db` file (its folder is made).

    Raises:
        MissingExtraError: pymilvus (or, for a local file, milvus-lite) is not installed.
    """
    pymilvus = require_extra("pymilvus", "milvus", "the Milvus index")
    if is_local(uri):
        require_extra("milvus_lite", "milvus", "a local Milvus database (milvus-lite)")
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    return pymilvus.MilvusClient(uri=uri)


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
