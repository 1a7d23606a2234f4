"""Embedding shards on disk: the chunk directories of an `encode.encode_corpus` job and
`list_shards`, which expands paths into shard directories and refuses an incomplete or mixed
job (so an index is never built from half of a corpus, or from two corpora); and which share of
the chunks a process encodes (`parse_shard`, `shard_from_env`). Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from chatretriever.io.embeddings import META, read_meta

logger = logging.getLogger(__name__)

SETTINGS = "encode_settings.json"
CHUNK_PREFIX = "chunk-"
_CHUNK_NAME = re.compile(rf"{CHUNK_PREFIX}\d+")  # chunk-00000; a copy (chunk-00001.bak) is not


def chunk_dir(out_dir: str | Path, index: int) -> Path:
    return Path(out_dir) / f"{CHUNK_PREFIX}{index:05d}"


def corpus_digest(chunk_digests: Iterable[str]) -> str:
    """One digest of a corpus from its chunks' `chunk_digest`s, in chunk order."""
    return hashlib.sha256("\n".join(chunk_digests).encode("ascii")).hexdigest()[:16]


def list_shards(paths: Iterable[str | Path]) -> list[Path]:
    """Expand paths into embedding shard directories, in chunk order.

    A path is either one shard (it holds `meta.json`) or an `encode_corpus` output directory.
    For the latter, every chunk must be present when the settings record a finished job, so an
    index is never built from half of a corpus.
    """
    out: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path}: not found")
        if (path / META).exists():
            out.append(path)
            continue
        chunks = sorted(
            (p for p in path.glob(f"{CHUNK_PREFIX}*") if _CHUNK_NAME.fullmatch(p.name)),
            key=_chunk_number,
        )
        chunks = [p for p in chunks if (p / META).exists()]
        if not chunks:
            hint = (f": a corpus index, whose embeddings are in {path / 'embeddings'}"
                    if (path / "embeddings").is_dir() else "")  # fmt: skip
            raise ValueError(
                f"{path} holds no embedding shards (no meta.json, no chunk-* dirs){hint}"
            )
        _check_complete(path, chunks)
        out.extend(chunks)
    return out


def _check_complete(path: Path, chunks: list[Path]) -> None:
    """Raise unless `chunks` are exactly chunks 0 .. num_chunks - 1 of an `encode_corpus` job.

    Names, not only the count, are compared: with several processes, the one that finished
    first has recorded num_chunks while the others still write theirs.
    """
    settings_path = path / SETTINGS
    if not settings_path.exists():  # chunk dirs gathered by hand: at least no gap among them
        _check_contiguous(path, chunks)
        return
    settings = json.loads(settings_path.read_text(encoding="utf-8"))
    expected = settings.get("num_chunks")
    if expected is None:
        raise ValueError(f"{path}: the encode job is unfinished (rerun it to resume)")
    want = {chunk_dir(path, j).name for j in range(expected)}
    found = {p.name for p in chunks}
    missing, stray = sorted(want - found), sorted(found - want)
    if missing:
        raise ValueError(
            f"{path} holds {len(found & want)} of {expected} chunks (missing {_few(missing)}): "
            "is an encode job (one of its processes) unfinished? rerun it to resume"
        )
    if stray:
        raise ValueError(
            f"{path} holds chunks beyond the corpus's {expected} ({_few(stray)}): left by an "
            "encoding of a longer corpus? use another output directory"
        )
    _check_one_corpus(path, chunks, settings.get("corpus_digest"))


def _check_one_corpus(path: Path, chunks: list[Path], recorded: str | None) -> None:
    """Raise unless the chunks' content digests make up the corpus the settings recorded."""
    held = [read_meta(c).extra.get("content") for c in chunks]
    if recorded is None or None in held:  # encoded before digests were recorded
        return
    if corpus_digest(held) != recorded:
        raise ValueError(
            f"{path}: its chunks do not make up the corpus its last encode job read (shard "
            "jobs run on different corpora, or on one that changed between them); rerun "
            "every shard on one corpus, or encode into another directory"
        )


def _chunk_number(path: Path) -> int:
    return int(path.name[len(CHUNK_PREFIX) :])


def _check_contiguous(path: Path, chunks: list[Path]) -> None:
    """Chunk dirs without the job's settings: refuse a gap (chunk 0 .. the last one found)."""
    numbers = sorted(_chunk_number(c) for c in chunks)
    missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
    if missing:
        names = [chunk_dir(path, j).name for j in missing]
        raise ValueError(
            f"{path} holds chunks up to {chunks[-1].name} but not {_few(names)} (and no "
            f"{SETTINGS} to tell the corpus's size): gather every chunk, or encode again"
        )
    logger.warning(
        "%s has no %s: chunks %s .. %s have no gap, but whether chunks after the last are "
        "missing cannot be told (copy the encode job's %s with its chunks)",
        path,
        SETTINGS,
        chunks[0].name,
        chunks[-1].name,
        SETTINGS,
    )


def _few(names: list[str], shown: int = 3) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def parse_shard(text: str) -> tuple[int, int]:
    """Parse "I/N" (e.g. "0/4") into (i, n)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {(i, n)}")
    return i, n


def shard_from_env(environ: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """The shard (i, n) of a process started by `torchrun`: (RANK, WORLD_SIZE).

    Args:
        environ: The environment to read (default this process's).

    Returns:
        (RANK, WORLD_SIZE), or None when neither is set (not started by a launcher).

    Raises:
        ValueError: Only one of them set, not integers, or RANK outside [0, WORLD_SIZE).
    """
    rank, world = environ.get("RANK"), environ.get("WORLD_SIZE")
    if rank is None and world is None:
        return None
    if rank is None or world is None:
        missing = "RANK" if rank is None else "WORLD_SIZE"
        raise ValueError(f"{missing} is not set but the other of RANK/WORLD_SIZE is")
    try:
        i, n = int(rank), int(world)
    except ValueError:
        raise ValueError(f"RANK={rank!r} and WORLD_SIZE={world!r} must be integers") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"RANK={i} WORLD_SIZE={n}: need 0 <= RANK < WORLD_SIZE")
    return i, n
