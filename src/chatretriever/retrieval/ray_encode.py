"""Encode a corpus on a Ray cluster (a Ray Data actor pool) into `encode`'s resumable layout.

The driver (this process) reads the corpus, keeps the finished chunks (`encode.chunk_done`: same
fingerprint, same ids) and sends the passages of the others through `Dataset.map_batches` with
a fixed pool of actors: each actor builds ONE encoder from `encoder_factory` (on its own GPU
when GPUs are asked for) and returns, for each passage, its embedding with its chunk index and
position. The driver writes a chunk (atomically, as `encode_corpus` does) as soon as all its
rows are back, so a killed job keeps every chunk it finished. Output directory, settings and
chunk metadata are those of `encode_corpus`; a chunk's "seconds" are the actor seconds spent on
its passages, and its metadata says `"engine": "ray"`.

The encoder's identity (name, fingerprint, dim) is needed before any chunk is kept or encoded.
It comes from one short Ray task that builds the encoder where the actors run (`max_calls=1`:
its worker exits, freeing the memory), so the driver loads no model and needs neither torch
nor a GPU; the price is one extra model load on the cluster.

The driver holds the pending passages' text until Ray Data has them (about the corpus file's
size); `Passage.metadata` is not sent (no encoder reads it). Torch-free; `ray` is imported
inside functions (`pip install 'chatretriever[ray]'`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chatretriever.errors import require_extra
from chatretriever.io.embeddings import write_embeddings
from chatretriever.retrieval.encode import (
    CorpusTally,
    EncodeConfig,
    EncodeResult,
    chunk_digest,
    chunk_dir,
    chunk_done,
    chunk_meta,
    finish_output,
    length_order,
    own_chunks,
    progress_bar,
    start_output,
)
from chatretriever.retrieval.encoders import Encoder, fingerprint_of
from chatretriever.types import Passage

logger = logging.getLogger(__name__)

EncoderFactory = Callable[[], Encoder]
# Ray Data's own INFO lines and its one "progress bars disabled" warning; warnings that matter
# (an actor pool that cannot be scheduled) still show.
_QUIET = {"ray.data": logging.WARNING, "ray.data._internal.progress": logging.ERROR}


@dataclass(frozen=True)
class EncoderIdentity:
    """What the settings record of an encoder (see `Encoder`), without its model."""

    name: str
    fingerprint: str | None
    dim: int
    normalize: bool


def identify(factory: EncoderFactory) -> EncoderIdentity:
    """Build an encoder and return its identity (run as a Ray task, where the actors run)."""
    encoder = factory()
    return EncoderIdentity(
        encoder.name, fingerprint_of(encoder), int(encoder.dim), bool(encoder.normalize)
    )


class EncodeActor:
    """One encoder per Ray actor: a batch of rows -> their embeddings, chunk and position.

    Args:
        factory: Builds the encoder (called once, in the actor).
    """

    def __init__(self, factory: EncoderFactory) -> None:
        self.encoder = factory()
        # what this actor computes: on a node with other hardware the precision `auto` picks
        # (hence the fingerprint) may differ from the identity task's, checked by `_collect`
        self.fingerprint = fingerprint_of(self.encoder) or ""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Encode one batch of rows {"chunk", "pos", "id", "title", "text"} (B rows).

        Returns:
            {"chunk", "pos": (B,), "embedding": (B, D) float32, "seconds": (B,) this call's
            time shared out, "runtime": (B,) JSON of `runtime_info()` in row 0, else "",
            "fingerprint": (B,) this actor's encoder fingerprint}.
        """
        rows = zip(batch["id"], batch["text"], batch["title"], strict=True)
        passages = [Passage(str(i), str(text), str(title)) for i, text, title in rows]
        start = time.perf_counter()
        emb = np.asarray(
            self.encoder.encode_passages(passages, batch_size=len(passages)), dtype=np.float32
        )  # (B, D)
        seconds = (time.perf_counter() - start) / max(len(passages), 1)
        runtime = [""] * len(passages)
        info = getattr(self.encoder, "runtime_info", None)  # what ran: hardware, dtype, ...
        if callable(info) and passages:
            runtime[0] = json.dumps(info())
        return {
            "chunk": np.asarray(batch["chunk"]),
            "pos": np.asarray(batch["pos"]),
            "embedding": emb,
            "seconds": np.full(len(passages), seconds),
            "runtime": np.asarray(runtime, dtype=object),
            "fingerprint": np.asarray([self.fingerprint] * len(passages), dtype=object),
        }


@dataclass
class _Pending:
    """A chunk being encoded: its ids, the rows back so far, and the actor seconds spent."""

    ids: list[str]
    rows: np.ndarray  # (N, D)
    left: int
    digest: str = ""  # encode.chunk_digest of its passages
    seconds: float = 0.0
    runtime: str = ""


def encode_corpus_ray(
    encoder_factory: EncoderFactory,
    passages: Iterable[Passage],
    out_dir: str | Path,
    config: EncodeConfig | None = None,
    *,
    address: str | None = None,
    num_actors: int | None = None,
    num_gpus_per_actor: float | None = 0,
    total: int | None = None,
) -> EncodeResult:
    """Encode a corpus on Ray into `encode_corpus`'s chunk shards, resuming finished chunks.

    Args:
        encoder_factory: A picklable zero-argument callable that builds the encoder, e.g.
            `functools.partial(load_encoder, name)`; called once per actor (and once for the
            identity, see the module docstring).
        passages: The corpus in a fixed order (a list or a stream).
        out_dir: Output directory (layout of `chatretriever.retrieval.encode`).
        config: Batch size (rows per actor call), chunk size, shard (its chunks only: all by
            default), length sorting (inside each chunk), progress bar.
        address: A running Ray cluster to join ("auto", "ray://host:10001", ...; its nodes
            need chatretriever and the model); None: start Ray on this machine with all its
            CPUs. A Ray this process already joined is used as it is, whatever `address` says.
            Only a connection made here is closed at the end (a local Ray stops with it).
        num_actors: Size of the actor pool; default one per GPU with GPUs, else one per node.
        num_gpus_per_actor: GPUs each actor takes; None: 1 when the cluster has GPUs, else 0.
        total: Number of passages, for the progress bar when `passages` has no len().

    Returns:
        Counts of chunks written and kept and of passages encoded by this call.
    """
    ray = require_extra("ray", "ray", "encoding on Ray")
    require_extra("ray.data", "ray", "encoding on Ray")
    config = config or EncodeConfig()
    out_dir = Path(out_dir)
    if total is None and isinstance(passages, Sequence):
        total = len(passages)
    with _ray_session(ray, address), _quiet_ray_data():
        gpus, actors, cpus = _actor_resources(ray, num_actors, num_gpus_per_actor)
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_calls=1)(identify)
        identity = ray.get(task.remote(encoder_factory))
        settings = start_output(identity, out_dir, config)
        tally = CorpusTally()
        rows, pending, kept = _pending_rows(passages, out_dir, config, settings, tally)
        with progress_bar(total, config) as bar:
            bar.update(sum(kept))
            if rows:
                ds = _dataset(ray, rows, encoder_factory, config, actors, cpus, gpus)
                del rows  # Ray holds them now
                _collect(ds, pending, out_dir, config, settings, bar)
    finish_output(out_dir, settings, tally)
    written, encoded = len(pending), sum(len(p.ids) for p in pending.values())
    logger.info(
        "%s: %d chunks written on Ray, %d kept from an earlier run", out_dir, written, len(kept)
    )
    counts = (written, len(kept), encoded, tally.num_chunks, tally.num_passages)
    return EncodeResult(out_dir, *counts)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse a `host:port` (or `ray://host:port`) no server answers on within `timeout` s.

    Ray itself retries an unreachable cluster for minutes; "auto" and other forms are left
    to it.
    """
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ValueError(
            f"--address {address}: no Ray cluster answers there ({e.strerror or e}); start one "
            "(`ray start --head`) or leave --address out to run Ray on this machine"
        ) from None


@contextmanager
def _ray_session(ray: Any, address: str | None) -> Iterator[None]:
    """Use this process's Ray when it has one, else join `address` or start a local Ray.

    Only a connection made here is closed at the end (`ray.shutdown`: a local Ray stops, a
    joined cluster runs on).
    """
    if ray.is_initialized():
        logger.info("encoding on the Ray this process already joined")
        yield  # the caller's Ray: used as it is and left running
        return
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address is None:
        ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **quiet)
    else:
        check_reachable(address)
        ray.init(address=address, **quiet)
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Ray Data without progress bars or INFO lines (this module shows one tqdm bar)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.enable_progress_bars
    levels = {name: logging.getLogger(name).level for name in _QUIET}
    ctx.enable_progress_bars = False
    for name, level in _QUIET.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        ctx.enable_progress_bars = before
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _actor_resources(
    ray: Any, num_actors: int | None, gpus: float | None
) -> tuple[float, int, float]:
    """(GPUs per actor, number of actors, CPUs per actor) for this cluster.

    Without GPUs each actor gets an equal share of the CPUs (at most one node's), so its torch
    threads (OMP_NUM_THREADS, set by Ray) do not oversubscribe the machine.
    """
    have = ray.cluster_resources()
    if gpus is None:
        gpus = 1.0 if have.get("GPU", 0) >= 1 else 0.0
    if gpus < 0 or (num_actors is not None and num_actors < 1):
        raise ValueError(f"need num_actors >= 1 and num_gpus_per_actor >= 0: {num_actors}, {gpus}")
    if gpus > 0:
        if have.get("GPU", 0) < gpus:
            logger.warning("the Ray cluster has %s GPUs; actors wait for one", have.get("GPU", 0))
        actors = num_actors or max(1, int(have.get("GPU", 0) // gpus))
        return gpus, actors, 1.0
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    actors = num_actors or max(1, len(nodes))
    per_node = min(nodes) if nodes else 1
    cpus = max(1, min(per_node, int(have.get("CPU", 1) // actors)))
    return 0.0, actors, float(cpus)


def _pending_rows(
    passages: Iterable[Passage],
    out_dir: Path,
    config: EncodeConfig,
    settings: dict[str, Any],
    tally: CorpusTally,
) -> tuple[list[dict[str, Any]], dict[int, _Pending], list[int]]:
    """Rows to encode (each chunk's in length order), the chunks they fill, and the sizes of
    the chunks kept."""
    rows: list[dict[str, Any]] = []
    pending: dict[int, _Pending] = {}
    kept: list[int] = []
    dim = int(settings["dim"])
    for j, chunk in own_chunks(passages, config, tally, out_dir):
        ids = [p.id for p in chunk]
        if chunk_done(chunk_dir(out_dir, j), chunk, settings):
            kept.append(len(chunk))
            continue
        rows_j = np.empty((len(chunk), dim), dtype=np.float32)
        pending[j] = _Pending(ids, rows_j, len(chunk), chunk_digest(chunk))
        order = length_order(chunk) if config.sort_by_length else range(len(chunk))
        for k in order:
            p = chunk[int(k)]
            rows.append({"chunk": j, "pos": int(k), "id": p.id, "title": p.title, "text": p.text})
    return rows, pending, kept


def _dataset(
    ray: Any,
    rows: list[dict[str, Any]],
    factory: EncoderFactory,
    config: EncodeConfig,
    actors: int,
    cpus: float,
    gpus: float,
) -> Any:
    """The lazy Ray dataset of embeddings: `rows` through a fixed pool of `EncodeActor`s."""
    # Blocks of a few batches: enough of them to keep every actor busy, few enough to batch well.
    per_block = 4 * config.batch_size
    blocks = min(len(rows), max(2 * actors, -(-len(rows) // per_block)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    return ds.map_batches(
        EncodeActor,
        fn_constructor_args=(factory,),
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=config.batch_size,
        batch_format="numpy",
        num_cpus=cpus,
        num_gpus=gpus,
    )


def _collect(
    ds: Any,
    pending: dict[int, _Pending],
    out_dir: Path,
    config: EncodeConfig,
    settings: dict[str, Any],
    bar: Any,
) -> None:
    """Place the embeddings coming back; write each chunk once all its rows are in."""
    dim = int(settings["dim"])
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        emb = np.asarray(batch["embedding"], dtype=np.float32)  # (B, D)
        if emb.ndim != 2 or emb.shape[1] != dim:
            raise ValueError(f"encoder returned rows of shape {emb.shape[1:]}, expected ({dim},)")
        _check_fingerprints(batch.get("fingerprint"), settings, out_dir)
        chunks = np.asarray(batch["chunk"])
        for j in np.unique(chunks):
            sel = chunks == j
            part = pending[int(j)]
            part.rows[np.asarray(batch["pos"])[sel]] = emb[sel]
            part.left -= int(sel.sum())
            part.seconds += float(np.asarray(batch["seconds"])[sel].sum())
            part.runtime = next((r for r in batch["runtime"][sel] if r), part.runtime)
            if part.left == 0:
                _write_chunk(int(j), part, out_dir, config, settings)
        bar.update(len(chunks))


def _check_fingerprints(got: Any, settings: dict[str, Any], out_dir: Path) -> None:
    """Refuse vectors an actor computed as another encoder than the one the settings record."""
    want = settings.get("fingerprint") or ""
    other = sorted({str(f) for f in (got if got is not None else []) if str(f) != want})
    if other:
        raise ValueError(
            f"{out_dir}: a Ray actor encodes as fingerprint {other[0]}, not {want} as the "
            "identity task did: another precision on its node (bf16 where the hardware has it "
            "natively, fp32 elsewhere)? pin the model's precision (`dtype` fp32 or bf16 in its "
            "chatretriever.json, not auto) so every node computes alike; finished chunks are kept"
        )


def _write_chunk(
    j: int, part: _Pending, out_dir: Path, config: EncodeConfig, settings: dict[str, Any]
) -> None:
    """Write chunk j (atomically) with its actor seconds and runtime; drop its rows."""
    extra: dict[str, Any] = {
        "seconds": round(part.seconds, 3),
        "content": part.digest,
        "engine": "ray",
    }
    if part.runtime:
        extra["runtime"] = json.loads(part.runtime)
    meta = chunk_meta(settings, j, config, extra)
    write_embeddings(chunk_dir(out_dir, j), part.ids, part.rows, meta)
    part.rows = np.empty((0, part.rows.shape[1]), dtype=np.float32)  # free the memory
