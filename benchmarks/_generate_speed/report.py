"""The summary and markdown table of `generate_speed.py`: per-path medians and tokens/s, the
paired ratio against the padded baseline, identical rows."""

from __future__ import annotations

import statistics
from typing import Any

from _shared.machine import BF16_FLAGS, machine_line

PATHS = ("padded", "prefilled")  # the baseline first


def summarize(runs: list[dict[str, Any]], n_batches: int) -> dict[str, Any]:
    """Per-path medians and tokens/s, the median paired ratio padded/prefilled, identical rows
    (those of the last round: greedy decoding repeats itself)."""
    paths = {}
    for path in PATHS:
        seconds = [r[f"{path}_s"] for r in runs]
        tokens = sum(r[f"{path}_tokens"] for r in runs)
        paths[path] = {
            "median_s_per_batch": round(statistics.median(seconds), 3),
            "tokens_per_s": round(tokens / sum(seconds), 2),
            "new_tokens": tokens,
        }
    last = runs[-n_batches:]
    return {
        "runs": runs,
        "paths": paths,
        "ratio_median": round(statistics.median(r["ratio"] for r in runs), 3),
        "ratio_of_medians": round(
            paths["padded"]["median_s_per_batch"] / paths["prefilled"]["median_s_per_batch"], 3
        ),
        "identical_rows": sum(r["identical_rows"] for r in last),
        "rows": sum(r["rows"] for r in last),
    }


def markdown(result: dict[str, Any]) -> str:
    """The table: path, median s per batch, tokens/s, ratio vs padded, identical rows."""
    m, s, info = result["measured"], result["settings"], result["machine"]
    flags = ", ".join(info["cpu_flags"]) or "none of " + "/".join(BF16_FLAGS)
    lines = [
        f"## Batched generation: {s['model']} ({result['dtype']}), {m['rows']} MTRAG grounded "
        f"prompts in batches of {s['batch_size']}, {s['max_new_tokens']} new tokens, greedy, "
        f"{s['rounds']} rounds interleaved",
        "",
        "| path | median s per batch | tokens/s | ratio vs padded | identical rows |",
        "|---|---|---|---|---|",
    ]
    for path in PATHS:
        p = m["paths"][path]
        ratio = "1.00 (baseline)" if path == "padded" else f"**{m['ratio_median']:.2f}**"
        same = "(reference)" if path == "padded" else f"{m['identical_rows']}/{m['rows']}"
        median, speed = f"{p['median_s_per_batch']:.2f}", f"{p['tokens_per_s']:.1f}"
        lines.append(f"| {path} | {median} | {speed} | {ratio} | {same} |")
    lines += [
        "",
        "Ratio: median over (batch, round) of padded s / prefilled s, measured in this run "
        f"(ratio of medians {m['ratio_of_medians']:.2f}). Prompt tokens per batch: "
        f"{result['prompt_tokens']['min']}-{result['prompt_tokens']['max']} per row, "
        f"{result['prompt_tokens']['real_share']:.0%} of the padded block real.",
        machine_line(info) + f" CPU flags: {flags}; transformers {info['transformers']}; load "
        f"average {info['loadavg_1_5_15'][0]} at start, {info['loadavg_1_5_15_at_end'][0]} at end.",
        "",
    ]
    return "\n".join(lines)


def prompt_stats(batches: list[list]) -> dict[str, Any]:
    """Prompt lengths and the share of real tokens in the padded blocks."""
    lengths = [len(r) for b in batches for r in b]
    padded = sum(len(b) * max(len(r) for r in b) for b in batches)
    return {
        "min": min(lengths),
        "max": max(lengths),
        "median": statistics.median(lengths),
        "real_share": round(sum(lengths) / padded, 3),
    }
