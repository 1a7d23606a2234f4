"""The report of `rationale.py quality`: its markdown tables (values x100, with each reranker's
time and prompt budgets) and its plot of the strategy subset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from _rationale.env import environment_words

# The measures of every table, in column order (`rationale.py` evaluates them).
MEASURES = ("R@1", "R@3", "R@5", "RR", "nDCG@10")


def _table(rows: dict[str, dict[str, float]]) -> list[str]:
    lines = [
        "| system | queries | " + " | ".join(MEASURES) + " |",
        "|---|---|" + "---|" * len(MEASURES),
    ]
    for name, row in rows.items():
        vals = " | ".join(f"{100 * row[m]:.1f}" for m in MEASURES)
        lines.append(f"| {name} | {row['queries']} | {vals} |")
    return lines


def quality_markdown(result: dict[str, Any]) -> str:
    lines = [f"{environment_words(result['environment'])}; values x100.", ""]
    for key, title in (
        ("strategy", "Strategy retrieval (8 strategies), all eval queries"),
        (
            "strategy_subset",
            f"Strategy retrieval, {result['rerank_queries']} evenly spaced eval queries",
        ),
        ("response", f"Response retrieval ({result['response_candidates']} supporter turns)"),
        (
            "response_subset",
            f"Response retrieval, the {result['rerank_queries']} queries; rerankers over the top "
            f"{result.get('rerank_response')} of minilm-l6",
        ),
    ):
        if key not in result:
            continue
        lines += [f"### {title}", "", *_table(result[key])]
        for name, t in result.get("timing", {}).get(key, {}).items():
            offline = t.get("document_states_s")
            offline = "" if offline is None else f"; document states {offline} s, offline"
            b = t.get("budgets")
            cut = "" if b is None else f"; prompts cut at {b['document']} / {b['query']} tokens"
            lines.append(f"- {name}: {t['seconds']} s for {t['queries']} queries "
                         f"({t['s_per_query']} s/query{offline}{cut})")  # fmt: skip
        lines.append("")
    return "\n".join(lines) + "\n"


def write_quality_plot(path: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["strategy_subset"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(rows)
    for i, m in enumerate(MEASURES):
        ax.bar(np.arange(len(names)) + i * 0.15, [rows[n][m] for n in names], width=0.15, label=m)
    ax.set_xticks(np.arange(len(names)) + 0.3, names, rotation=15, fontsize=8)
    ax.set_title("ESConv strategy retrieval (eval subset)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
