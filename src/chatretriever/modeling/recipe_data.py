"""A recipe's `data:` section, shared by every training method: the training files (`DataFile`:
path, repeat, limit), CSIT's query formulation and per-source caps (`DataSettings`), and reading
them into (examples, repeat) per file with the caps applied (`load_examples`, `cap_sources`).

A cap keeps the examples of a source whose sha256 of (seed, id) is lowest (`hash_sample`): the
same examples every run, and a smaller cap keeps a subset of a larger one. Torch-free.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from chatretriever.config import _from_dict

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class DataFile:
    """One training JSONL file and how many times its examples are listed per epoch."""

    path: str
    repeat: int = 1
    limit: int | None = None  # use only the first `limit` examples

    def __post_init__(self) -> None:
        if self.repeat < 1:
            raise ValueError(f"data file {self.path}: repeat must be >= 1, got {self.repeat}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data file {self.path}: limit must be >= 1, got {self.limit}")


def _data_file(value: Any) -> DataFile:
    """A `data.files` entry: a DataFile, {path, repeat?, limit?}, or a path alone."""
    if isinstance(value, DataFile):
        return value
    if isinstance(value, (str, Path)):
        return DataFile(str(value))
    return _from_dict(DataFile, value)


@dataclass
class BaseDataSettings:
    """A recipe's `data:` section: the training files. Methods subclass it to add their own
    fields (e.g. CSIT's query formulation)."""

    files: list[DataFile] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.files, (str, Mapping)):
            raise ValueError(f"data.files must be a list of files, got {self.files!r}")
        self.files = [_data_file(f) for f in self.files]
        if not self.files:
            raise ValueError("data.files must list at least one training JSONL file")


def load_examples(
    settings: BaseDataSettings, read: Callable[[str], Iterable[T]]
) -> list[tuple[list[T], int]]:
    """(examples, repeat) per data file; `read` is the method's reader of one file."""
    parts = []
    for f in settings.files:
        examples = list(islice(read(f.path), f.limit))
        logger.info("%s: %d examples x %d", f.path, len(examples), f.repeat)
        parts.append((examples, f.repeat))
    return parts


@dataclass
class DataSettings(BaseDataSettings):
    """Training files, the query side's formulation and per-source caps.

    A file's weight in the mix is its `repeat`; `caps` ({source: n}) keeps at most n examples
    of a source (an example's `source` field) over all files, chosen by a hash of (seed, id):
    the same examples for every run, and a smaller cap keeps a subset of a larger one.
    """

    query: str = "session"
    caps: dict[str, int] = field(default_factory=dict)
    cap_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.query not in ("session", "last_turn"):
            raise ValueError(f"data.query must be 'session' or 'last_turn', got {self.query!r}")
        for source, n in self.caps.items():
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"data.caps.{source} must be a positive integer, got {n!r}")


def hash_sample(examples: list[Any], n: int, seed: int = 0) -> list[Any]:
    """The `n` examples whose sha256 of (seed, id) is lowest, in that order: the same ones every
    run, and a smaller n keeps a subset of a larger one (what `data.caps` keeps of a source)."""
    return sorted(examples, key=lambda ex: hashlib.sha256(f"{seed}\x1f{ex.id}".encode()).digest())[
        :n
    ]


def cap_sources(
    parts: list[tuple[list[Any], int]], caps: Mapping[str, int], seed: int = 0
) -> list[tuple[list[Any], int]]:
    """Apply `DataSettings.caps` to (examples, repeat) per file (examples keep their order);
    logs each capped source's count before and after.

    Raises:
        ValueError: a capped source that no example has (a typo would lift the cap silently).
    """
    if not caps:
        return parts
    present = sorted({ex.source for examples, _ in parts for ex in examples})
    absent = [s for s in caps if s not in present]
    if absent:
        names = [repr(s) if s else "'' (no source field)" for s in present]
        raise ValueError(
            f"data.caps.{absent[0]}: no training example has source {absent[0]!r} "
            f"(sources present: {', '.join(names)})"
        )
    keep: set[str] = set()
    for source, n in caps.items():
        of_source = [ex for examples, _ in parts for ex in examples if ex.source == source]
        kept = hash_sample(of_source, n, seed)
        keep.update(ex.id for ex in kept)
        logger.info("data.caps.%s: %d -> %d examples", source, len(of_source), len(kept))
    return [
        ([ex for ex in examples if ex.source not in caps or ex.id in keep], repeat)
        for examples, repeat in parts
    ]
