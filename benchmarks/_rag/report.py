"""The report of benchmarks/rag.py: the markdown table and the plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from _shared.machine import machine_line

from chatretriever.errors import MissingExtraError, require_extra
from chatretriever.io.atomic import atomic_path, atomic_write

MEASURES = ("nDCG@3", "R@10")


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _hit_miss(c: Mapping[str, Any] | None) -> str:
    if not c:
        return "-"
    hit, miss = c["hit"], c["miss"]
    return f"{_cell(hit['f1'])} / {_cell(miss['f1'])} ({hit['n']}/{miss['n']})"


def _paired(r: Mapping[str, Any], measure: str, key: str = "paired") -> str:
    test = (r.get(key) or {}).get(measure)
    return "-" if test is None else f"{test['diff']:+.4f} ({test['p']:.3f})"


def results_table(records: Sequence[Mapping[str, Any]], baseline: str | None = None) -> str:
    """The markdown table: one row per system (metrics of rows that do not retrieve are "-"),
    with the paired differences against the `baseline` row when it was run."""
    head = ["system", *MEASURES, "F1", "ROUGE-L", "F1 hit / miss (n)", "n"]
    if baseline:
        head += [f"ΔnDCG@3 vs {baseline} (p)", f"ΔF1 vs {baseline} (p)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        m = r["metrics"]
        cells = [r["id"], *(_cell(m[x]) for x in (*MEASURES, "F1", "ROUGE-L"))]
        cells += [_hit_miss(r.get("consistency")), str(r["n"])]
        if baseline:
            cells += [_paired(r, "nDCG@3"), _paired(r, "F1")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(records: Sequence[Mapping[str, Any]], baseline: str) -> str:
    """The ablation rows against the row they ablate (`baseline`), paired over the same turns."""
    head = ["system", "nDCG@3", "F1", "ROUGE-L"]
    head += [f"ΔnDCG@3 vs {baseline} (p)", f"ΔF1 vs {baseline} (p)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if r["id"] != baseline and "paired_ablation" not in r:
            continue
        m = r["metrics"]
        cells = [r["id"], *(_cell(m[x]) for x in ("nDCG@3", "F1", "ROUGE-L"))]
        cells += [_paired(r, x, "paired_ablation") for x in ("nDCG@3", "F1")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def corpus_line(corpus: Mapping[str, Any], turns: int) -> str:
    """What was searched: the full corpus, or the pool and its size."""
    if not corpus["pooled"]:
        return f"Corpus: the full MTRAG corpus, {corpus['passages']:,} passages."
    return (
        f"Corpus: POOLED, {corpus['passages']:,} of {corpus['full_passages']:,} passages: every "
        f"passage judged for the {turns} evaluated turns plus BM25's top {corpus['depth']} of "
        "each turn (last turn, full corpus). Retrieval is easier than on the full corpus."
    )


def write_markdown(path: Path, summary: Mapping[str, Any], records: Sequence[Mapping]) -> str:
    judged = next((r["n_judged"] for r in records if "n_judged" in r), "-")
    which = summary["eval_conversations"] or "all conversations"
    if summary["limit"]:
        which += f", a sample of {summary['limit']} (lowest sha1 of the turn id)"
    text = [
        "# MTRAG-UN retrieval-augmented generation",
        "",
        f"{summary['turns']} turns answered ({which}); retrieval measures over the {judged} "
        f"judged ones; each answer reads the top {summary['k']} passages. "
        + corpus_line(summary["corpus"], summary["turns"]),
        "",
        results_table(records, summary.get("paired_against")),
        "",
        "F1: SQuAD token F1, ROUGE-L: F-measure, both against the reference response. "
        f"F1 hit / miss: judged turns whose top {summary['k']} holds a relevant passage or not."
        + (
            " Δ: paired randomisation test (10,000 sign flips) over the turns both rows scored."
            if summary.get("paired_against") or summary.get("ablations_against")
            else ""
        ),
        "",
    ]
    against = summary.get("ablations_against")
    if against:
        text += [f"Ablations against `{against}`:", "", ablation_table(records, against), ""]
    text += [f"- {r['id']}: {r['description']}" for r in records]
    text += [f"- skipped {s['system']}: {s['reason']}" for s in summary["skipped"]]
    if "machine" in summary:
        text.append("\n" + machine_line(summary["machine"]))
    text.append(f"\n`{summary['command']}`\n")
    out = "\n".join(text)
    with atomic_write(path) as f:
        f.write(out)
    return out


def write_plot(path: Path, records: Sequence[Mapping[str, Any]]) -> bool:
    """Bar chart of F1 and nDCG@3 per system (needs matplotlib)."""
    try:
        require_extra("matplotlib", "plot", "the plot").use("Agg")
        plt = require_extra("matplotlib.pyplot", "plot", "the plot")
    except MissingExtraError as e:
        print(f"  no plot: {e}")
        return False
    y = np.arange(len(records))
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.45 * len(records)))
    for offset, measure in ((-0.2, "F1"), (0.2, "nDCG@3")):
        values = [r["metrics"][measure] for r in records]
        ax.barh(y + offset, [np.nan if v is None else v for v in values], 0.4, label=measure)
    ax.set_yticks(y, [r["id"] for r in records])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("score (no nDCG@3 bar: the row does not retrieve)")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return True
