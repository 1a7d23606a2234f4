"""The results: the issue's two targets, the markdown table, the plot, the environment, and
OUT/index_scale.{json,md} written after each system."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from _index_scale import memory
from _index_scale.memory import GIB
from _index_scale.systems import load_faiss
from chatretriever.errors import MissingExtraError, require_extra
from chatretriever.io.atomic import atomic_path, atomic_write
from chatretriever.retrieval.evaluate import write_json

TARGET_HNSW = {"n": 1_000_000, "queries_per_s": 3000.0, "recall": 0.95}
TARGET_IVFPQ = {"n": 10_000_000, "memory_bytes": 8 * GIB, "recall": 0.90}


def targets(rows: list[dict]) -> dict[str, Any]:
    """The issue's two targets, judged on the rows of their sizes (None: size not measured)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    hnsw = [r for r in ok if r["system"] == "hnsw" and r["n"] == TARGET_HNSW["n"]]
    good = [r for r in hnsw if r["recall_at_k"] >= TARGET_HNSW["recall"]]
    best = max((r["qps_batched"] for r in good), default=None)
    ivf = [r for r in ok if r["system"] == "ivfpq-rerank" and r["n"] == TARGET_IVFPQ["n"]]
    fits = [
        r
        for r in ivf
        if r.get("rerank_depth") and r["recall_at_k"] >= TARGET_IVFPQ["recall"]
        if max(r["model_bytes"], r["rss_delta_bytes"]) <= TARGET_IVFPQ["memory_bytes"]
    ]
    return {
        "hnsw_1m": {
            **TARGET_HNSW,
            "best_qps_at_recall": best,
            "met": None if not hnsw else bool(best and best >= TARGET_HNSW["queries_per_s"]),
        },
        "ivfpq_10m": {
            **TARGET_IVFPQ,
            "best_recall_fitting": max((r["recall_at_k"] for r in fits), default=None),
            "met": None if not ivf else bool(fits),
        },
    }


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / GIB:.2f}"


def markdown(result: dict) -> str:
    """The markdown report: the set and the machine, a table per size, the targets."""
    env, s, k = result["environment"], result["set"], result["k"]
    lines = [
        "# Large-index benchmark with real structure",
        "",
        f"Base vectors: {s['base_passages']:,} real {s['model']} passages (dim {s['dim']}), "
        f"cycled, plus {s['noise_shape']} Gaussian noise of norm {s['noise']} x the median "
        f"nearest-neighbour distance {s['nn_distance']:.4f}, renormalised; {s['queries']:,} "
        f"held-out passages plus noise as queries. {env['cpu_count']} CPUs ({env['cpu_model']}), "
        f"{result['faiss_threads']} Faiss threads, load {env['loadavg_1_5_15']} at the start. "
        f"Recall@{k} against the exact top {k}; re-ranking reads {s['rerank_dtype']} vectors "
        "from an on-disk memmap; model = the bytes/vector model of the index (ids of the "
        "DenseIndex apart); RSS = measured change over the build (over loading it when reused).",
    ]
    for size in result["sizes"]:
        lines += _size_lines(size, k)
    t = result["targets"]
    lines += [
        "",
        f"Targets: HNSW at 1M >= {TARGET_HNSW['queries_per_s']:.0f} queries/s at recall@10 >= "
        f"{TARGET_HNSW['recall']}: {_verdict(t['hnsw_1m'])} "
        f"(best {t['hnsw_1m']['best_qps_at_recall']}); "
        f"IVF-PQ re-ranked at 10M within 8 GiB at recall@10 >= {TARGET_IVFPQ['recall']}: "
        f"{_verdict(t['ivfpq_10m'])} (best {t['ivfpq_10m']['best_recall_fitting']}).",
        "",
        f"`{result['command']}`",
        "",
    ]
    return "\n".join(lines)


def _size_lines(size: dict, k: int) -> list[str]:
    """The markdown of one size: the structure kept, then a table row per system setting."""
    st = size["structure"]
    lines = [
        "",
        f"## {size['n']:,} vectors",
        "",
        f"{st['copies_per_passage']} copies per passage; cosine to the generator passage "
        f"{st['cosine_to_generator']}; copy rate {st['copy_rate']} (at most "
        f"{st['copy_rate_max']}); real-neighbour rate {st['real_neighbour_rate']}; exact "
        f"top-{k} scan {size['exact_s']:.1f} s.",
        "",
        f"| system | build | search | build s | RSS GiB | model B/vec | model GiB "
        f"| q/s batched | q/s single | recall@{k} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in size["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['system']} | {r['series']} | {r['status']} |||||||")
            continue
        lines.append(
            f"| {r['system']} | {r['series']} | {r['setting']} | {r['build_s']:.1f}"
            f"{' (cached)' if r['reused'] else ''} | {_gib(r['rss_delta_bytes'])} | "
            f"{r['model_bytes_per_vector'] or '-'} | {_gib(r['model_bytes'])} | "
            f"{r['qps_batched']:.0f} | {r['qps_single']:.0f} | {r['recall_at_k']:.4f} |"
        )
    return lines


def _verdict(target: dict) -> str:
    return {None: "not measured", True: "met", False: "missed"}[target["met"]]


def plot(result: dict, path: Path) -> bool:
    """Recall vs batched queries/s, one panel per size, one line per index series."""
    try:
        require_extra("matplotlib", "plot", "the plot").use("Agg")
        plt = require_extra("matplotlib.pyplot", "plot", "the plot")
    except MissingExtraError as e:
        print(f"  no plot: {e}")
        return False
    sizes = result["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 4.8), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        series: dict[str, list[dict]] = {}
        for r in size["rows"]:
            if r["status"] == "ok":
                series.setdefault(r["series"], []).append(r)
        for name, rs in series.items():
            rs = sorted(rs, key=lambda r: r["recall_at_k"])
            ax.plot(
                [r["qps_batched"] for r in rs], [r["recall_at_k"] for r in rs], "o-", label=name
            )
        ax.set_xscale("log")
        ax.set_xlabel("queries/s (all queries in one call)")
        ax.set_ylabel(f"recall@{result['k']} vs exact")
        ax.set_title(f"{size['n']:,} vectors")
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return True


def environment() -> dict[str, Any]:
    """The machine and what else ran (load average before this process works)."""
    faiss = load_faiss()
    cpu = None
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), None)
    free = memory.available_bytes()
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "memory_available_gib": None if free is None else round(free / GIB, 1),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
    }


def save(result: dict, out: Path) -> str:
    """JSON and markdown, atomically (after each system: a long run keeps its rows so far);
    returns the markdown."""
    result["targets"] = targets([r for s in result["sizes"] for r in s["rows"]])
    write_json(out / "index_scale.json", result)
    text = markdown(result)
    with atomic_write(out / "index_scale.md") as f:
        f.write(text)
    return text
