"""The cached, resumable runs: one TREC run per system, reused while its settings key holds.

Each run is written to OUT/runs/<system>.trec with its settings beside it; the settings record a
key (system, the retriever's fingerprint, formulation, k, the task ids, and the rewrite model and
prompt), and a run whose recorded key equals the current one is reused. The fingerprint is the
encoder's own (`Encoder.fingerprint`: weights, settings, precision), so a model retrained in
place is searched again and the same model moved to another path (same label) is not. Corpus
embeddings go chunk by chunk into OUT/emb/<label>.<fingerprint>/ (`chatretriever.retrieval.
encode`, resumable) and LLM rewrites into OUT/rewrites.<model>.jsonl, so a rerun costs nothing:
OUT/fingerprints.json remembers each model's fingerprint while its files are unchanged (their
names, sizes and mtimes), so a cached run needs no model load.

With `--pool P` the searched corpus is a pool (`_conversational.pool`): its runs go to
OUT/runs.<tag>/, its embeddings to OUT/emb/<label>.<fingerprint>.<tag>/, and the key records
the tag, so pooled and full-corpus results never mix.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from _conversational import backends
from _conversational.pool import pooled_corpus
from _conversational.systems import HYBRID, System, fused_formulation, slug
from chatretriever.apps.registry import precision_of
from chatretriever.io.files import read_json
from chatretriever.io.mtrag import iter_mtrag_corpus
from chatretriever.io.trec import read_run
from chatretriever.modeling.fingerprint import digest
from chatretriever.retrieval.encode import EncodeConfig, encode_corpus, encode_seconds, list_shards
from chatretriever.retrieval.encoders import Encoder, fingerprint_of
from chatretriever.retrieval.evaluate import write_json
from chatretriever.retrieval.fusion import FusionConfig, fuse_runs
from chatretriever.retrieval.search import Formulation, save_run, search_dense, settings_path
from chatretriever.types import Passage, Qrel, Run, Session, qrels_to_dict

FINGERPRINTS = "fingerprints.json"


@dataclasses.dataclass(frozen=True)
class Pool:
    """`--pool P`: the pool of the evaluated tasks (their judgments and BM25's top `depth`)."""

    depth: int
    sessions: Sequence[Session]
    qrels: Sequence[Qrel]

    def judged(self) -> dict[str, dict[str, int]]:
        return qrels_to_dict(self.qrels)


class Workspace:
    """Lazily built shared pieces: corpus, BM25 index, one encoder, its corpus index, rewrites.

    Each piece records the seconds it took, so every system reports the full cost of what it
    used (a shared piece counts once in each system that uses it).
    """

    def __init__(
        self,
        args: argparse.Namespace,
        sessions: list[Session],
        corpus_path: Path,
        pool: Pool | None = None,
    ) -> None:
        self.args = args
        self.sessions = sessions
        self.corpus_path = corpus_path
        self.pool = pool
        self.out = Path(args.out)
        self._corpus: list[Passage] | None = None
        self._pool_info: dict[str, Any] | None = None
        self._bm25: tuple[Any, float] | None = None
        self._encoder: tuple[str, Encoder] | None = None
        self._index: tuple[str, Any, dict[str, float]] | None = None
        self._rewritten: tuple[list[Session], float] | None = None

    def corpus(self) -> list[Passage]:
        """The searched passages: the whole corpus, or with a `Pool` its pooled passages."""
        if self._corpus is None:
            bar = tqdm(iter_mtrag_corpus(self.corpus_path), desc="read corpus", unit="passage")
            full = list(bar)
            self._corpus = full
            if self.pool is not None:
                pool, cache = self.pool, self.out / "pools"
                pooled, tag = pooled_corpus(full, pool.sessions, pool.judged(), pool.depth, cache)
                self._corpus = pooled
                self._pool_info = {
                    "depth": self.pool.depth,
                    "tag": tag,
                    "passages": len(pooled),
                    "full_passages": len(full),
                    "tasks": len(self.pool.sessions),
                }
                print(f"pooled corpus {tag}: {len(pooled):,} of {len(full):,} passages")
        return self._corpus

    def pool_info(self) -> dict[str, Any] | None:
        """The pool's depth, tag and size (None: the whole corpus is searched)."""
        if self.pool is None:
            return None
        self.corpus()
        return self._pool_info

    @property
    def corpus_tag(self) -> str:
        """The pool's tag (`pool<P>-<sha of its ids>`), or "full"."""
        info = self.pool_info()
        return "full" if info is None else str(info["tag"])

    @property
    def runs_dir(self) -> Path:
        return self.out / ("runs" if self.pool is None else f"runs.{self.corpus_tag}")

    def bm25(self) -> tuple[Any, float]:
        """(BM25Retriever over the corpus, seconds to build it)."""
        if self._bm25 is None:
            from chatretriever.retrieval.bm25 import BM25Retriever

            corpus = self.corpus()
            start = time.perf_counter()
            retriever = BM25Retriever(corpus, show_progress=True)
            self._bm25 = (retriever, time.perf_counter() - start)
        return self._bm25

    def encoder(self, spec: str) -> Encoder:
        """The encoder of `spec`; the previously loaded one is released first."""
        if self._encoder is None or self._encoder[0] != spec:
            self._encoder = self._index = None
            backends.release_memory()
            print(f"  loading {spec}" + (f" on {self.args.device}" if self.args.device else ""))
            self._encoder = (spec, backends.load_model(spec, self.args.device))
        return self._encoder[1]

    def fingerprint(self, spec: str) -> str:
        """The fingerprint of the encoder of `spec` (its name for an encoder without one).

        Read from OUT/fingerprints.json while the files of `spec` and the device are as they were
        when it was recorded, so a cached run needs no model load; else the model is loaded.
        """
        memo_path = self.out / FINGERPRINTS
        memo = read_json(memo_path) if memo_path.exists() else {}
        state = {"files": files_state(spec), "device": self.args.device}
        entry = memo.get(spec)
        loaded = self._encoder is not None and self._encoder[0] == spec
        if not loaded and isinstance(entry, dict) and entry.get("state") == state:
            return str(entry["fingerprint"])
        fingerprint = fingerprint_of(self.encoder(spec)) or spec
        if not isinstance(entry, dict) or entry.get("fingerprint") != fingerprint:
            memo[spec] = {"state": state, "fingerprint": fingerprint}
            write_json(memo_path, memo)
        return fingerprint

    def index(self, spec: str, label: str) -> tuple[Any, dict[str, float]]:
        """(corpus index of an encoder, {"corpus_encode_s", "index_s"})."""
        if self._index is None or self._index[0] != spec:
            encoder = self.encoder(spec)
            emb_dir = self.out / "emb" / f"{slug(label)}.{self.fingerprint(spec)}"
            if self.pool is not None:
                emb_dir = emb_dir.with_name(f"{emb_dir.name}.{self.corpus_tag}")
            encode_s = self._encode(encoder, emb_dir)
            start = time.perf_counter()
            index = backends.build_index(list_shards([emb_dir]))
            timing = {"corpus_encode_s": encode_s, "index_s": time.perf_counter() - start}
            self._index = (spec, index, timing)
        return self._index[1], self._index[2]

    def _encode(self, encoder: Encoder, emb_dir: Path) -> float:
        """Encode the corpus (resuming); returns the encoding seconds summed over every run,
        killed ones included (each chunk records its own time)."""
        config = EncodeConfig(batch_size=self.args.batch_size, chunk_size=self.args.chunk_size)
        encode_corpus(encoder, self.corpus(), emb_dir, config)
        return encode_seconds(emb_dir)

    def rewritten(self) -> tuple[list[Session], float]:
        """(sessions with LLM rewrites, total generation seconds over all calls)."""
        if self._rewritten is None:
            from chatretriever.retrieval.rewrite import rewrite_sessions

            model = self.args.rewrite_model
            cache = self.out / f"rewrites.{slug(model)}.jsonl"
            timing_path = self.out / f"rewrites.{slug(model)}.timing.json"
            fresh = not cache.exists()  # timings of a deleted cache no longer count
            timing = read_json(timing_path) if timing_path.exists() and not fresh else {}
            timing.setdefault("seconds", 0.0)
            generate = backends.make_generator(model, self.args.device, self.args.max_new_tokens)
            start = time.perf_counter()
            sessions = rewrite_sessions(self.sessions, generate, model, cache_path=cache)
            timing["seconds"] += time.perf_counter() - start
            write_json(timing_path, timing)
            self._rewritten = (sessions, float(timing["seconds"]))
            backends.release_memory()  # the generator and its model are gone
        return self._rewritten


def files_state(spec: str) -> str | None:
    """A cheap digest of the files a model spec loads (names, sizes, mtimes; not their bytes):
    its directory's, and those of a saved retriever's base model when that is a local directory.

    None for a spec without a local directory (a built-in embedder name, a registered prefix):
    such a spec is taken to load the same model while the device is the same.
    """
    from chatretriever.modeling.sources import builtin_retriever_dir

    path = builtin_retriever_dir(spec) or Path(spec)
    if not path.is_dir():
        return None
    dirs = [path]
    saved = path / "chatretriever.json"
    if saved.is_file():
        base = read_json(saved).get("retriever", {}).get("base_model")
        dirs += [Path(base)] if base and Path(base).is_dir() else []
    files = sorted(p for d in dirs for p in d.iterdir() if p.is_file())
    return digest([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


# formulations that join several turns into one text (`search.join_turns`)
JOINED = (Formulation.ALL_USER_TURNS.value, Formulation.FULL_HISTORY.value)


def run_key(
    system: System,
    args: argparse.Namespace,
    sessions: Sequence[Session],
    fingerprint: str | None = None,
) -> dict:
    """What determines a run: a cached run is reused only when its recorded key is equal.

    Args:
        system: The system.
        args: The benchmark's arguments (k, rewrite model).
        sessions: The queries.
        fingerprint: The fingerprint of a dense system's encoder (`Workspace.fingerprint`).
    """
    ids = "\n".join(sorted(s.id for s in sessions)).encode("utf-8")
    key = {
        "system": system.id,
        "retriever": fingerprint if system.dense else system.retriever,
        "formulation": system.formulation,
        "k": args.k,
        "queries": len(sessions),
        "queries_sha1": hashlib.sha1(ids).hexdigest(),
    }
    if system.dense and system.formulation in JOINED:
        # turns joined in the order the encoder's cut keeps the question (`search.
        # joins_newest_first`): runs of an LLM encoder cached before that joined them otherwise
        key["join"] = "question_kept"
    if system.family == "rewrite":
        from chatretriever.retrieval.rewrite import RewritePrompt

        key["rewrite_model"] = args.rewrite_model
        key["rewrite_prompt"] = RewritePrompt().hash
    if system.family == HYBRID:
        key["fusion"] = fusion_config(system, args).to_dict()
    return key


def fusion_config(system: System, args: argparse.Namespace) -> FusionConfig:
    """The fusion of a hybrid row: its method (the last part of its formulation) and the
    `--rrf-k` / `--fusion-weight` settings."""
    method = system.formulation.rsplit(".", 1)[-1]
    return FusionConfig(method, args.rrf_k, args.fusion_weight)


def make_hybrid_run(system: System, ws: Workspace) -> tuple[Run, dict[str, float], dict[str, Any]]:
    """Fuse a dense system's run (made earlier in this benchmark: it is planned first) with
    BM25 on `--bm25-formulation`."""
    args = ws.args
    dense_path = ws.runs_dir / f"{slug(f'{system.label}.{fused_formulation(system)}')}.trec"
    if not dense_path.exists():
        raise ValueError(f"{system.id}: the run it fuses is missing ({dense_path})")
    retriever, index_s = ws.bm25()
    start = time.perf_counter()
    sparse = retriever.search(ws.sessions, args.k, args.bm25_formulation)
    fusion = fusion_config(system, args)
    dense = Run(read_run(dense_path).scores, name=system.label)
    run = fuse_runs(dense, sparse, fusion)
    timing = {"index_s": index_s, "query_s": time.perf_counter() - start}
    dense_wall = read_json(settings_path(dense_path)).get("wall_s", 0.0)
    timing["dense_run_s"] = float(dense_wall)
    extra = {
        "fusion": fusion.to_dict(),
        "bm25_formulation": args.bm25_formulation,
        "bm25": retriever.settings,
        "dense_run": str(dense_path),
    }
    return Run(run.scores, name=system.id), timing, extra


def cached_settings(run_path: Path, key: dict) -> dict | None:
    """The settings of a finished run with this key (written after the run file), else None."""
    path = settings_path(run_path)
    if not (run_path.exists() and path.exists()):
        return None
    settings = read_json(path)
    if settings.get("key") != key:
        print(f"  {run_path.name}: settings changed since it was made: running again")
        return None
    return settings


def make_run(system: System, ws: Workspace) -> tuple[Run, dict[str, float], dict[str, Any]]:
    """Search with one system; returns (run, timing in seconds, extra settings)."""
    if system.family == HYBRID:
        return make_hybrid_run(system, ws)
    args = ws.args
    sessions, timing, extra = ws.sessions, {}, {}
    formulation = system.formulation
    if system.family == "rewrite":
        sessions, timing["rewrite_s"] = ws.rewritten()
        formulation = Formulation.REWRITE.value
        extra["rewrite_model"] = args.rewrite_model
    if system.dense:
        index, index_timing = ws.index(system.retriever, system.label)
        timing.update(index_timing)
        encoder = ws.encoder(system.retriever)
        extra.update(
            encoder=encoder.name,
            fingerprint=fingerprint_of(encoder),
            dim=encoder.dim,
            index=index.factory,
            device=backends.device_of(encoder),
            precision=precision_of(encoder),
        )
        start = time.perf_counter()
        run = search_dense(
            encoder, index, sessions, args.k, formulation, batch_size=args.query_batch_size
        )
    else:
        retriever, timing["index_s"] = ws.bm25()
        extra["bm25"] = retriever.settings
        start = time.perf_counter()
        run = retriever.search(sessions, args.k, formulation)
    timing["query_s"] = time.perf_counter() - start
    return Run(run.scores, name=system.id), timing, extra


def produce_runs(systems: Sequence[System], ws: Workspace, data_path: str) -> list[dict[str, Any]]:
    """Make (or reuse) the run of every system; returns one record per system."""
    records = []
    for n, system in enumerate(systems, start=1):
        run_path = ws.runs_dir / f"{system.id}.trec"
        fingerprint = ws.fingerprint(system.retriever) if system.dense else None
        key = run_key(system, ws.args, ws.sessions, fingerprint)
        if ws.pool is not None:
            key["corpus"] = ws.corpus_tag
        settings = cached_settings(run_path, key)
        cached = settings is not None
        print(f"[{n}/{len(systems)}] {system.id}: " + ("cached run" if cached else "running"))
        if settings is None:
            run, timing, extra = make_run(system, ws)
            settings = {
                "key": key,
                **dataclasses.asdict(system),
                "data": data_path,
                "corpus_passages": len(ws.corpus()),
                "timing_s": {k: round(v, 3) for k, v in timing.items()},
                "wall_s": round(sum(timing.values()), 3),
                **extra,
            }
            save_run(run_path, run, settings, depth=ws.args.k)
        records.append({"id": system.id, "run": str(run_path), "cached": cached, **settings})
    return records
