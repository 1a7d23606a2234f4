"""The demo job: a model reading whole conversations against the baselines a user would try.

The shipped demo data (`chatretriever/demo/`: corpus.jsonl, conversations.jsonl, qrels.tsv) has
twelve conversations whose later questions lean on earlier ones ("how long does it live?"), over
a corpus where every topic has close distractors (the lifespans of four big cats, the moons of four
planets). `run_demo` indexes the corpus with the model, retrieves for every turn with the full
session (the model) and with the last turn alone (BM25); optionally with a session-free embedder
on all user turns (the strongest session-free baseline on MTRAG-UN: all-MiniLM-L6-v2) and with
the hybrid of the model and BM25 (`retrieval.fusion`). It scores every run and writes the runs,
`results.json` and `metrics.png` to the output directory. Nothing here prints.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from chatretriever.apps.chat import Hit, format_hits, to_hits
from chatretriever.apps.registry import set_precision
from chatretriever.io.corpus import read_corpus
from chatretriever.io.sessions import read_sessions
from chatretriever.io.trec import read_qrels
from chatretriever.retrieval.corpus_index import build_corpus_index
from chatretriever.retrieval.encode import EncodeConfig
from chatretriever.retrieval.encoders import Encoder
from chatretriever.retrieval.evaluate import Evaluation, evaluate_run, write_json
from chatretriever.retrieval.fusion import FusionConfig, fuse_runs
from chatretriever.retrieval.search import Formulation, save_run, search_dense
from chatretriever.types import Passage, Qrel, Run, Session, qrels_to_dict

logger = logging.getLogger(__name__)

# RR@10 averaged over the turns is MRR@10.
MEASURES = ("nDCG@3", "RR@10", "R@10")
LABELS = {"RR@10": "MRR@10"}
DEPTH = 10  # passages saved per turn and system: enough for every measure above
FUSION_DEPTH = 100  # passages each fused run contributes to the hybrid
SHOWN = 3  # passages shown per turn and system


@dataclass(frozen=True)
class DemoData:
    """The three demo files, read with the project's loaders."""

    corpus_path: Path
    conversations_path: Path
    qrels_path: Path
    passages: list[Passage]
    sessions: list[Session]
    qrels: list[Qrel]


def demo_dir() -> Path:
    """Where the demo files are installed (package data of `chatretriever`)."""
    return Path(str(resources.files("chatretriever") / "assets" / "demo"))


def load_demo_data(directory: str | Path | None = None) -> DemoData:
    """Read corpus.jsonl, conversations.jsonl and qrels.tsv (from `demo_dir()` by default)."""
    root = Path(directory) if directory is not None else demo_dir()
    corpus, conversations, qrels = (
        root / "corpus.jsonl",
        root / "conversations.jsonl",
        root / "qrels.tsv",
    )
    passages = read_corpus(corpus)
    sessions = read_sessions(conversations)
    judged = read_qrels(qrels, {s.id for s in sessions}, {p.id for p in passages})
    return DemoData(corpus, conversations, qrels, passages, sessions, judged)


@dataclass(frozen=True)
class TurnResult:
    """The top passages of both systems for one turn of a demo conversation."""

    session: Session
    relevant: dict[str, int]
    model_hits: list[Hit]
    bm25_hits: list[Hit]


@dataclass
class DemoResult:
    """What `run_demo` computed and where it wrote it."""

    model: str
    systems: dict[str, str]  # system label -> run name
    turns: list[TurnResult]
    evaluations: dict[str, Evaluation]  # system label -> scores
    out_dir: Path
    index_dir: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    dtype: str | None = None  # compute precision set on the model; None: as loaded
    fusion: FusionConfig | None = None  # the hybrid's settings; None: no hybrid row


def run_demo(
    encoder: Encoder,
    model: str,
    out_dir: str | Path,
    data: DemoData | None = None,
    batch_size: int = 16,
    show_progress: bool = True,
    dtype: str | None = None,
    baseline: tuple[str, Encoder] | None = None,
    fusion: FusionConfig | None = None,
) -> DemoResult:
    """Index the demo corpus, run every system on every turn, score them and save everything.

    Args:
        encoder: The model (any `Encoder`; ChatRetriever reads the whole session).
        model: The name `encoder` was loaded by (recorded in the index and results).
        out_dir: Output directory: index-<model>/ (a corpus index, reused by a rerun), the two
            runs (model.trec, bm25.trec), results.json and metrics.png.
        data: The demo data (default: the shipped files).
        batch_size: Passages and sessions per encoder call.
        show_progress: Show tqdm bars.
        dtype: "fp32", "bf16" or "auto": the model's compute precision (`set_precision`), also
            part of the index directory's name; None leaves the model as loaded. bf16 rounding
            can move a passage by a rank, so fixing fp32 gives the same numbers on every machine.
        baseline: (name, encoder) of a session-free embedder searched with all user turns
            concatenated (its own index in out_dir, reused by a rerun); None: no such row.
        fusion: The hybrid of the model's session run and BM25's last-turn run (each run's top
            `FUSION_DEPTH` fused); None: no hybrid row.

    Returns:
        Per-turn top passages and per-system scores; `files` names what was written.
    """
    from chatretriever.retrieval.bm25 import BM25Retriever

    data = data or load_demo_data()
    out_dir = Path(out_dir)
    config = EncodeConfig(batch_size=batch_size, show_progress=show_progress)
    if dtype is not None and not set_precision(encoder, dtype):
        dtype = None  # a model without a precision switch
    suffix = f"-{dtype}" if dtype else ""
    # One per model and precision: a rerun reuses its embeddings.
    index_dir = out_dir / f"index-{_slug(model)}{suffix}"
    built = build_corpus_index(encoder, model, data.corpus_path, index_dir, config=config)
    depth = FUSION_DEPTH if fusion is not None else DEPTH

    def search(enc: Encoder, index: Any, formulation: Formulation, k: int) -> Run:
        return search_dense(
            enc, index, data.sessions, k, formulation, batch_size, show_progress=show_progress
        )

    dense = search(encoder, built.index, Formulation.SESSION, depth)
    bm25 = BM25Retriever(data.passages, show_progress=show_progress)
    sparse = bm25.search(data.sessions, k=depth, formulation=Formulation.LAST_TURN)
    runs = {f"{model} (session)": dense, "BM25 (last turn)": sparse}
    slugs = ["model", "bm25"]  # the run files' names, in the order of `runs`
    if baseline is not None:
        name, other = baseline
        other_index = build_corpus_index(
            other, name, data.corpus_path, out_dir / f"index-{_slug(name)}", config=config
        )
        runs[f"{name} (all user turns)"] = search(
            other, other_index.index, Formulation.ALL_USER_TURNS, DEPTH
        )
        slugs.append("baseline")
    if fusion is not None:
        label = f"hybrid: {model} + BM25 ({fusion.method})"
        runs[label] = fuse_runs(dense, sparse, fusion)
        slugs.append("hybrid")
    evaluations = {label: evaluate_run(run, data.qrels, MEASURES) for label, run in runs.items()}
    turns = _turn_results(data, dense, sparse, built.passages or {})
    names = {label: run.name for label, run in runs.items()}
    result = DemoResult(
        model, names, turns, evaluations, out_dir, index_dir, dtype=dtype, fusion=fusion
    )
    result.files = _save(result, runs, slugs, data)
    return result


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def _turn_results(
    data: DemoData, dense: Run, sparse: Run, passages: Mapping[str, Passage]
) -> list[TurnResult]:
    judged = qrels_to_dict(data.qrels)
    out = []
    for s in data.sessions:
        model_hits, bm25_hits = (
            to_hits([(d.doc_id, d.score) for d in run.ranked(s.id)[:SHOWN]], passages)
            for run in (dense, sparse)
        )
        out.append(TurnResult(s, dict(judged.get(s.id, {})), model_hits, bm25_hits))
    return out


def _save(
    result: DemoResult, runs: Mapping[str, Run], slugs: Sequence[str], data: DemoData
) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for (label, run), slug in zip(runs.items(), slugs, strict=True):
        path = result.out_dir / f"{slug}.trec"
        save_run(path, run, {"system": label, "model": result.model}, depth=DEPTH)
        files[f"{slug}_run"] = path
    files["results"] = result.out_dir / "results.json"
    write_json(files["results"], results_dict(result, data))
    files["plot"] = plot_metrics(result.evaluations, result.out_dir / "metrics.png")
    return files


def results_dict(result: DemoResult, data: DemoData) -> dict[str, Any]:
    """Everything `run_demo` measured, as JSON-ready data."""

    def hits(hs: Sequence[Hit]) -> list[dict[str, Any]]:
        return [{"rank": h.rank, "id": h.doc_id, "score": h.score, "title": h.title} for h in hs]

    return {
        "model": result.model,
        "dtype": result.dtype,
        "data": {
            "corpus": str(data.corpus_path),
            "conversations": str(data.conversations_path),
            "qrels": str(data.qrels_path),
            "passages": len(data.passages),
            "sessions": len(data.sessions),
        },
        "measures": list(MEASURES),
        "depth": DEPTH,
        "fusion": None if result.fusion is None else result.fusion.to_dict(),
        "systems": {
            label: {"run": result.systems[label], **ev.to_dict(per_query=True)}
            for label, ev in result.evaluations.items()
        },
        "turns": [
            {
                "id": t.session.id,
                "question": t.session.question,
                "relevant": t.relevant,
                "model": hits(t.model_hits),
                "bm25": hits(t.bm25_hits),
            }
            for t in result.turns
        ],
    }


def plot_metrics(evaluations: Mapping[str, Evaluation], path: str | Path) -> Path:
    """A grouped bar chart (one group per measure, one bar per system) saved as PNG."""
    from chatretriever.errors import require_extra
    from chatretriever.io.atomic import atomic_write

    require_extra("matplotlib", "plot", "the demo plot").use("Agg")  # no display needed
    plt = require_extra("matplotlib.pyplot", "plot", "the demo plot")

    path = Path(path)
    labels = list(evaluations)
    width = 0.8 / max(len(labels), 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, label in enumerate(labels):
        values = [evaluations[label].aggregate.get(m, 0.0) for m in MEASURES]
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(MEASURES))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(MEASURES)), [LABELS.get(m, m) for m in MEASURES])
    ax.set_ylim(0, 1.25)  # headroom for the legend above the bars
    ax.set_ylabel("score (mean over turns)")
    ax.set_title("Demo conversations: whole session vs the baselines")
    ax.legend(loc="upper center", ncol=min(len(labels), 2), fontsize=8, frameon=False)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return path


def format_turn(turn: TurnResult, labels: Sequence[str], snippet_chars: int = 0) -> str:
    """One turn: its id and question, then the top passages of the model and BM25 (the first
    two `labels`; "*" = relevant)."""
    s = turn.session
    earlier = sum(1 for t in s.history if t.role == "user")
    lines = [
        f"{s.id}  {s.question}" + (f"  (after {earlier} earlier questions)" if earlier else "")
    ]
    for label, hits in zip(labels[:2], (turn.model_hits, turn.bm25_hits), strict=True):
        lines.append(f"  {label}:")
        lines.append(format_hits(hits, turn.relevant, snippet_chars, indent="    "))
    return "\n".join(lines)


def format_metrics(evaluations: Mapping[str, Evaluation]) -> str:
    """The scores as a table: one row per system, one column per measure."""
    names = [LABELS.get(m, m) for m in MEASURES]
    width = max(len("system"), *(len(label) for label in evaluations))
    rows = [f"{'system':<{width}}  " + "  ".join(f"{n:>7}" for n in names)]
    for label, ev in evaluations.items():
        values = "  ".join(f"{ev.aggregate.get(m, float('nan')):>7.3f}" for m in MEASURES)
        rows.append(f"{label:<{width}}  {values}")
    queries = {ev.num_queries for ev in evaluations.values()}
    rows.append(f"({', '.join(map(str, sorted(queries)))} judged turns)")
    return "\n".join(rows)
