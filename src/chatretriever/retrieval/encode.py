"""Corpus -> embedding shards: length-sorted batches, split across processes, resumable.

Layout of an output directory:

    out/encode_settings.json     the resolved settings (model name and fingerprint, chunk size,
                                 counts when finished)
    out/chunk-00000/             one embedding shard per fixed-size chunk of the corpus
        embeddings.npy  ids.txt  meta.json          (see `chatretriever.io.embeddings`)

Chunk j holds passages [j * chunk_size, (j + 1) * chunk_size) in corpus order; process i of n
encodes the chunks with j % n == i. Each chunk is written atomically (a temporary directory is
renamed into place), so after an interruption the finished chunks are kept and only the rest is
computed. Chunks are kept only for the same model, by content (`Encoder.fingerprint`): a model
retrained in place under the same name is refused, not mixed in; and only for the same passages:
a chunk records a digest of its ids, titles and texts, and one whose passages changed their text
under the same ids is encoded again. Torch-free: the encoder does
the model work.

Several processes (`torchrun`: `shards.shard_from_env`) share one directory: each writes the same
settings, and each records the corpus's chunk count when its own chunks are done. The count is a
fact of the corpus, not a "job done" flag: `list_shards` takes the directory only when every
chunk 0 .. num_chunks - 1 is on disk, so one finished process never makes a half-encoded
directory look complete. `ray_encode` runs the same layout on a Ray cluster.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from chatretriever.io.atomic import atomic_write
from chatretriever.io.embeddings import (
    EMBEDDINGS,
    IDS,
    META,
    EmbeddingMeta,
    read_meta,
    warn_if_by_name,
    write_embeddings,
)
from chatretriever.retrieval.encoders import Encoder, fingerprint_of
from chatretriever.retrieval.shards import (  # noqa: F401  (list_shards: this module's surface)
    CHUNK_PREFIX,
    SETTINGS,
    chunk_dir,
    corpus_digest,
    list_shards,
)
from chatretriever.types import Passage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeConfig:
    """How to encode a corpus.

    Attributes:
        batch_size: Passages per call to the encoder.
        chunk_size: Passages per shard directory (the unit of resumption and of splitting).
        shard: (i, n): this process encodes chunks j with j % n == i.
        sort_by_length: Batch passages of similar length together (less padding).
        show_progress: Show a tqdm bar (passages/s).
    """

    batch_size: int = 64
    chunk_size: int = 10_000
    shard: tuple[int, int] = (0, 1)
    sort_by_length: bool = True
    show_progress: bool = True

    def __post_init__(self) -> None:
        i, n = self.shard
        if n < 1 or not 0 <= i < n:
            raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {self.shard}")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError("batch_size and chunk_size must be positive")


@dataclass(frozen=True)
class EncodeResult:
    """What one `encode_corpus` call did."""

    out_dir: Path
    chunks_written: int
    chunks_kept: int
    passages_encoded: int
    num_chunks: int
    num_passages: int


def _settings(encoder: Encoder, config: EncodeConfig) -> dict[str, Any]:
    # The shard index is left out: every process of one job writes the same settings.
    return {
        "model": encoder.name,
        "fingerprint": fingerprint_of(encoder),
        "dim": int(encoder.dim),
        "normalized": bool(encoder.normalize),
        "chunk_size": config.chunk_size,
        "batch_size": config.batch_size,
        "sort_by_length": config.sort_by_length,
        "num_shards": config.shard[1],
    }


def _write_settings(out_dir: Path, settings: dict[str, Any]) -> None:
    with atomic_write(out_dir / SETTINGS) as f:
        json.dump(settings, f, indent=2)


def _meta_of(settings: dict[str, Any]) -> EmbeddingMeta:
    """The encoder identity that settings (this run's or a recorded one) describe."""
    return EmbeddingMeta(
        model=str(settings.get("model")),
        dim=int(settings.get("dim", 0)),
        normalized=bool(settings.get("normalized", True)),
        fingerprint=settings.get("fingerprint"),
    )


def _check_resumable(out_dir: Path, settings: dict[str, Any]) -> None:
    """Refuse to mix chunks of another model or chunk size into one output directory.

    The model is compared by fingerprint; a directory written before fingerprints existed by
    name (with a warning).
    """
    path = out_dir / SETTINGS
    if not path.exists():
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    before, now = _meta_of(old), _meta_of(settings)
    if not before.same_model(now):
        raise ValueError(
            f"{out_dir} holds embeddings of model={before.model!r} ({_fp(before)}), not of "
            f"model={now.model!r} ({_fp(now)}): another model, or one retrained since; use "
            "another output directory (or delete this one to encode again)"
        )
    for key in ("dim", "normalized", "chunk_size"):
        if old.get(key) != settings[key]:
            raise ValueError(
                f"{out_dir} holds embeddings with {key}={old.get(key)!r}, not {settings[key]!r}; "
                "use another output directory"
            )
    warn_if_by_name(out_dir, before, now)


def _fp(meta: EmbeddingMeta) -> str:
    return f"fingerprint {meta.fingerprint}" if meta.fingerprint else "no fingerprint"


def chunk_digest(passages: Sequence[Passage]) -> str:
    """A digest of a chunk's ids, titles and texts: a kept chunk must hold these very passages."""
    h = hashlib.sha256()
    for p in passages:
        for part in (p.id, p.title, p.text):
            h.update(part.encode("utf-8"))
            h.update(b"\0")
    return h.hexdigest()[:16]


def chunk_done(path: Path, passages: Sequence[Passage], settings: dict[str, Any]) -> bool:
    """True when a finished chunk of exactly these passages (ids and texts) is already on disk.

    A chunk of other ids is refused (the corpus was reordered or replaced); a chunk whose
    passages kept their ids but changed their text or title is encoded again, as is another
    model's chunk and a damaged one (its vectors or some of its ids missing: a partial copy).
    Chunks written before digests were recorded are matched by ids.
    """
    if not (path / META).exists():
        return False
    meta = read_meta(path)
    want = [p.id for p in passages]
    on_disk = (path / IDS).read_text(encoding="utf-8").splitlines() if (path / IDS).exists() else []
    if on_disk != want[: len(on_disk)]:
        raise ValueError(
            f"{path} holds other passages than this corpus (another corpus was encoded into "
            f"{path.parent}, or this one changed): encode into another directory, or delete "
            f"{path.parent} to encode again"
        )
    damage = _damage(path, len(on_disk), len(want))
    if damage:
        logger.warning("%s is damaged (%s): encoding it again", path, damage)
        return False
    digest = meta.extra.get("content")
    if digest is not None and digest != chunk_digest(passages):
        logger.info("%s: its passages' texts changed: encoding it again", path)
        return False
    return meta.compatible_with(_meta_of(settings))  # another model's chunk is encoded again


def _damage(path: Path, ids_on_disk: int, ids_wanted: int) -> str | None:
    """What is missing from a chunk dir whose metadata is there (None: nothing)."""
    if ids_on_disk != ids_wanted:
        return f"{IDS} holds {ids_on_disk} of its {ids_wanted} ids"
    try:
        rows = np.load(path / EMBEDDINGS, mmap_mode="r", allow_pickle=False).shape[0]
    except (OSError, ValueError):
        return f"{EMBEDDINGS} is missing or unreadable"
    return None if rows == ids_wanted else f"{EMBEDDINGS} holds {rows} rows for {ids_wanted} ids"


def length_order(passages: Sequence[Passage]) -> np.ndarray:
    """Indices of `passages`, longest first (stable): the order batches are encoded in."""
    lengths = np.array([len(p.title) + len(p.text) for p in passages])
    return np.argsort(-lengths, kind="stable")  # longest first: memory errors show up early


def encode_chunk(
    encoder: Encoder, passages: Sequence[Passage], config: EncodeConfig, bar: tqdm | None = None
) -> np.ndarray:
    """Encode passages in (length-sorted) batches; returns (N, D) float32 rows in input order."""
    order = length_order(passages) if config.sort_by_length else np.arange(len(passages))
    out = np.empty((len(passages), encoder.dim), dtype=np.float32)  # (N, D)
    for start in range(0, len(passages), config.batch_size):
        idx = order[start : start + config.batch_size]
        batch = [passages[i] for i in idx]
        emb = np.asarray(encoder.encode_passages(batch, batch_size=len(batch)), dtype=np.float32)
        if emb.shape != (len(batch), encoder.dim):
            want = (len(batch), encoder.dim)
            raise ValueError(f"encoder returned {emb.shape}, expected {want}")
        out[idx] = emb
        if bar is not None:
            bar.update(len(batch))
    return out


def _chunks(passages: Iterable[Passage], size: int) -> Iterator[list[Passage]]:
    it = iter(passages)
    while chunk := list(islice(it, size)):
        yield chunk


@dataclass
class CorpusTally:
    """Chunks and passages of the whole corpus, counted while `own_chunks` reads it, and the
    content digest of every chunk (`corpus_digest` combines them)."""

    num_chunks: int = 0
    num_passages: int = 0
    digests: list[str] = field(default_factory=list)


def own_chunks(
    passages: Iterable[Passage],
    config: EncodeConfig,
    tally: CorpusTally,
    out_dir: Path | None = None,
) -> Iterator[tuple[int, list[Passage]]]:
    """Yield (j, passages of chunk j) for this shard's chunks (j % n == i), in corpus order.

    Every chunk, this shard's or not, is counted into `tally` (complete once exhausted). With
    `out_dir`, another shard's chunk already there must hold this corpus's passages: a shard
    job run on another corpus (or on this one edited since) is refused, not mixed in.
    """
    i, n = config.shard
    for j, chunk in enumerate(_chunks(passages, config.chunk_size)):
        digest = chunk_digest(chunk)
        tally.num_chunks, tally.num_passages = j + 1, tally.num_passages + len(chunk)
        tally.digests.append(digest)
        if j % n == i:
            yield j, chunk
        elif out_dir is not None:
            _check_other_chunk(chunk_dir(out_dir, j), chunk)


def _check_other_chunk(path: Path, chunk: Sequence[Passage]) -> None:
    """Refuse another shard's chunk that holds other passage ids (another corpus). Other texts
    under the same ids are that shard's to encode again (`chunk_done`); `index` refuses the
    directory until it has (`_check_one_corpus`)."""
    ids_file = path / IDS
    if not (path / META).exists() or not ids_file.exists():
        return
    held = ids_file.read_text(encoding="utf-8").splitlines()
    if held != [p.id for p in chunk]:
        raise ValueError(
            f"{path} holds other passage ids than this corpus's chunk there: {path.parent} was "
            "encoded (by another shard job) from another corpus; encode into another directory"
        )


def start_output(encoder: Encoder, out_dir: Path, config: EncodeConfig) -> dict[str, Any]:
    """Create `out_dir`, refuse another model's or chunk size's chunks, record the settings.

    Args:
        encoder: The encoder, or any object with its `name`, `fingerprint`, `dim`, `normalize`.
        out_dir: The output directory.
        config: The encoding settings.

    Returns:
        The settings written (without the corpus counts, recorded by `finish_output`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = _settings(encoder, config)
    _check_resumable(out_dir, settings)
    _write_settings(out_dir, settings)
    return settings


def chunk_meta(
    settings: dict[str, Any], j: int, config: EncodeConfig, extra: dict[str, Any]
) -> EmbeddingMeta:
    """The metadata of chunk j: the encoder identity, where the chunk starts, and `extra`
    (encoding seconds, runtime, ...)."""
    info = {"kind": "passage", "chunk": j, "start": j * config.chunk_size, **extra}
    return EmbeddingMeta(**{**asdict(_meta_of(settings)), "extra": info})


def finish_output(out_dir: Path, settings: dict[str, Any], tally: CorpusTally) -> None:
    """Record the corpus's chunk and passage counts (what `list_shards` checks against)."""
    counts = {
        "num_chunks": tally.num_chunks,
        "num_passages": tally.num_passages,
        "corpus_digest": corpus_digest(tally.digests),
    }
    _write_settings(out_dir, {**settings, **counts})


def encode_corpus(
    encoder: Encoder,
    passages: Iterable[Passage],
    out_dir: str | Path,
    config: EncodeConfig | None = None,
    total: int | None = None,
) -> EncodeResult:
    """Encode a corpus into chunked embedding shards under `out_dir`, resuming finished chunks.

    Args:
        encoder: Any `Encoder`; its `encode_passages` is called once per batch.
        passages: The corpus in a fixed order (a list or a stream, e.g. `iter_corpus(path)`).
        out_dir: Output directory (see the module docstring for its layout).
        config: Batch size, chunk size, shard (i, n), length sorting, progress bar.
        total: Number of passages, for the progress bar when `passages` has no len().

    Returns:
        Counts of chunks written and kept and of passages encoded by this call.
    """
    config = config or EncodeConfig()
    out_dir = Path(out_dir)
    settings = start_output(encoder, out_dir, config)
    if total is None and isinstance(passages, Sequence):
        total = len(passages)
    written = kept = encoded = 0
    tally = CorpusTally()
    with progress_bar(total, config) as bar:
        for j, chunk in own_chunks(passages, config, tally, out_dir):
            ids = [p.id for p in chunk]
            path = chunk_dir(out_dir, j)
            if chunk_done(path, chunk, settings):
                kept += 1
                bar.update(len(chunk))
                continue
            start = time.perf_counter()
            emb = encode_chunk(encoder, chunk, config, bar)
            # The time is stored with the chunk, so it survives a killed run.
            extra: dict[str, Any] = {
                "seconds": round(time.perf_counter() - start, 3),
                "content": chunk_digest(chunk),
            }
            runtime = getattr(encoder, "runtime_info", None)  # what ran: hardware, dtype, ...
            if callable(runtime):
                extra["runtime"] = runtime()
            write_embeddings(path, ids, emb, chunk_meta(settings, j, config, extra))
            written += 1
            encoded += len(chunk)
    finish_output(out_dir, settings, tally)
    logger.info("%s: %d chunks written, %d kept from an earlier run", out_dir, written, kept)
    return EncodeResult(out_dir, written, kept, encoded, tally.num_chunks, tally.num_passages)


def progress_bar(total: int | None, config: EncodeConfig) -> tqdm:
    """A passages/s bar over this shard's share of `total` passages."""
    i, n = config.shard
    return tqdm(
        total=None if total is None else _shard_total(total, config),
        unit="passage",
        desc=f"encode {i}/{n}",
        disable=not config.show_progress,
    )


def encode_seconds(out_dir: str | Path) -> float:
    """Seconds spent encoding the finished chunks of `out_dir`, over every (resumed) run.

    Each chunk records its own time when it is written, so the total stays right when the work
    was spread over several runs, some of them killed.
    """
    chunks = Path(out_dir).glob(f"{CHUNK_PREFIX}*/{META}")  # finished chunks, job done or not
    return float(sum(read_meta(meta.parent).extra.get("seconds", 0.0) for meta in chunks))


def _shard_total(total: int, config: EncodeConfig) -> int:
    """How many of `total` passages fall in this process's chunks."""
    i, n = config.shard
    size = config.chunk_size
    return sum(min(size, total - j * size) for j in range(i, -(-total // size), n))
