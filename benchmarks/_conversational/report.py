"""The results: metrics, paired tests against the best BM25 run, and the files that show them.

OUT/results[.<ids file>].json holds every record, .md the table, .png a bar chart. The paired
randomisation test is `chatretriever.retrieval.evaluate.compare`. Recall is measured at
min(100, --k) (`measures`): a run holds --k passages, so "R@100" of a shallower run is recall at
its depth, and is named so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _shared.machine import machine_line
from _shared.paths import keep_previous
from tqdm.auto import tqdm

from _conversational.systems import LLM_REWRITE
from chatretriever.errors import MissingExtraError, require_extra
from chatretriever.io.atomic import atomic_path, atomic_write
from chatretriever.io.trec import read_run
from chatretriever.retrieval.evaluate import write_json
from chatretriever.types import Qrel

RECALL_DEPTH = 100  # the recall cut of runs at least this deep (the default --k)
MEASURE_LABELS = {"RR@10": "MRR@10"}


def measures(k: int = RECALL_DEPTH) -> tuple[str, ...]:
    """The measures of runs `k` passages deep, in table order.

    Args:
        k: The depth of the runs (`--k`).

    Returns:
        nDCG@3, nDCG@10, RR@10 and recall at min(100, k): ir_measures' R@100 of a run holding
        k < 100 passages equals its R@k, which is what it is called here.
    """
    return ("nDCG@3", "nDCG@10", "RR@10", f"R@{min(RECALL_DEPTH, k)}")


MEASURES = measures()  # of the default --k (seeds.py scores runs made with it)


def evaluate_records(
    records: list[dict], qrels: Sequence[Qrel], names: Sequence[str] = MEASURES
) -> str | None:
    """Add metrics (`names`, see `measures`) to every record, and paired tests against the best
    BM25 run.

    Returns:
        The id of that baseline (None when no plain BM25 system ran).
    """
    from chatretriever.retrieval.evaluate import compare, evaluate_run

    evaluations = {}
    for r in tqdm(records, desc="evaluate", unit="run"):
        ev = evaluate_run(read_run(r["run"]), qrels, names)
        evaluations[r["id"]] = ev
        r["metrics"] = ev.aggregate
        r["num_queries"] = ev.num_queries
        r["num_missing_from_run"] = len(ev.missing_from_run)
        # tasks judged only with rel=0 stay in the means (as the published numbers have them)
        r["num_no_relevant"] = len(ev.no_relevant)
    bm25 = [r for r in records if r["family"] == "bm25"]
    if not bm25:
        return None
    baseline = max(bm25, key=lambda r: r["metrics"]["nDCG@3"])["id"]
    for r in records:
        if r["id"] != baseline:
            r["vs_baseline"] = compare(evaluations[baseline], evaluations[r["id"]])
    return baseline


def fmt_p(p: float) -> str:
    """A p-value for a table: "<0.001" below that, else three decimals."""
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def delta_cell(test: dict | None) -> str:
    """A paired comparison (`evaluate.compare`'s entry of one measure) as "+0.0123 (0.045)"."""
    return f"{test['diff']:+.4f} ({fmt_p(test['randomization_p'])})" if test else "-"


def table_head(
    first: Sequence[str],
    last: Sequence[str],
    reference: str | None,
    names: Sequence[str] = MEASURES,
) -> list[str]:
    """The two header lines of a results table: `first` columns, one per measure of `names`,
    `last` columns, then the nDCG@3 difference against `reference`."""
    vs = f"ΔnDCG@3 vs {reference} (p)" if reference else "ΔnDCG@3"
    head = [*first, *(MEASURE_LABELS.get(m, m) for m in names), *last, vs]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def results_table(
    records: list[dict], baseline: str | None, names: Sequence[str] = MEASURES
) -> str:
    """The markdown table: one row per system, in planning order (family, model, formulation),
    a column per measure of `names`."""
    lines = table_head(["system", "formulation"], ["wall s"], baseline, names)
    for r in records:
        formulation = r["formulation"]
        if r.get("fusion"):  # the fusion's settings: rows of other weights / k differ
            f = r["fusion"]
            k = f"k={f['rrf_k']}, " if f["method"] == "rrf" else ""
            formulation += f" ({k}w={f['weight']})"
        if r["family"] == "rewrite":
            formulation = f"{LLM_REWRITE} ({r['rewrite_model']})"
        test = r.get("vs_baseline", {}).get("nDCG@3")
        delta = delta_cell(test)
        if r["id"] == baseline:
            delta = "baseline"
        cells = [r["label"], formulation]
        cells += [f"{r['metrics'][m]:.4f}" for m in names]
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
        results_table(records, baseline, summary["measures"]),
        "",
        "wall s: corpus encoding (or BM25 indexing) + index building + LLM rewriting where used "
        "+ query encoding and search; shared steps count in full for each system using them. "
        "MRR@10 = RR@10. Δ: paired randomisation test (10,000 sign flips).",
    ]
    if summary["eval_conversations"]:
        text.insert(3, f"Conversations: {summary['eval_conversations']} only.\n")
    for s in summary["skipped"]:
        text.append(f"\n- skipped {s['system']}: {s['reason']}")
    if "machine" in summary:  # beside the wall s column
        text.append("\n" + machine_line(summary["machine"]))
    text.append(f"\n`{summary['command']}`\n")
    out = "\n".join(text)
    with atomic_write(path) as f:
        f.write(out)
    return out


def pyplot() -> Any | None:
    """matplotlib.pyplot on the Agg backend, or None (saying why) when matplotlib is missing."""
    try:
        matplotlib = require_extra("matplotlib", "plot", "the plot")
        matplotlib.use("Agg")
        return require_extra("matplotlib.pyplot", "plot", "the plot")
    except MissingExtraError as e:
        print(f"  no plot: {e}")
        return None


def save_figure(plt: Any, fig: Any, path: Path) -> None:
    """Save a figure atomically (never a half-written PNG) and close it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def write_plot(path: Path, records: list[dict], recall: str = MEASURES[-1]) -> bool:
    """Bar chart of nDCG@3 and `recall` (the table's recall measure) per system (needs
    matplotlib)."""
    if (plt := pyplot()) is None:
        return False
    names = [r["id"] for r in records]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.45 * len(names)))
    for offset, measure in ((-0.2, "nDCG@3"), (0.2, recall)):
        ax.barh(y + offset, [r["metrics"][measure] for r in records], 0.4, label=measure)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("score")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    save_figure(plt, fig, path)
    return True


def write_results(
    out: Path, suffix: str, summary: dict, records: list[dict], baseline: str | None
) -> str:
    """Write OUT/results<suffix>.{json,md,png}; returns the markdown. Results there made with
    other settings (`summary["settings"]`) are kept as results<suffix>.prev[-N].*."""
    files = [out / f"results{suffix}.{ext}" for ext in ("json", "md", "png")]
    keep_previous(files, summary.get("settings", {}))
    write_json(out / f"results{suffix}.json", {**summary, "systems": records})
    table = write_markdown(out / f"results{suffix}.md", summary, records, baseline)
    write_plot(out / f"results{suffix}.png", records, summary["measures"][-1])
    return table
