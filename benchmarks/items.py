"""RecLM-emb item retrieval on Steam: BM25, off-the-shelf and fine-tuned MiniLM, per task.

Stages (each timed): build the ten tasks' data, evaluate BM25 and off-the-shelf `minilm-l6`,
fine-tune MiniLM (in-batch negatives off, the paper's setting) and evaluate it, the ablation
with in-batch negatives on, and the leave-one-task-out row (trained without `--holdout`, tested
on it); `--lora` fine-tunes LoRA adapters instead of every weight (the rows say "(LoRA)").
Writes results.json, results.md (Hit@5 and nDCG@10 tables, a column per task and the
mean) and hit5.png (a heatmap) into --out; those of a run with other options are kept as
results.prev[-N].json, results.prev[-N].md, hit5.prev[-N].png. Heavy: run it under the shared
lock, e.g.

    nohup flock /tmp/chatretriever-heavy.lock .venv/bin/python benchmarks/items.py \
        --out outputs/bench-items > /tmp/items-bench.log 2>&1 &
    python benchmarks/items.py --out /tmp/smoke --train-per-task 20 --test-per-task 5 \
        --catalog-size 3000 --steps 2 --batch-size 2                    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from chatretriever.io.atomic import atomic_path, atomic_write
from chatretriever.io.reclm import load_reclm
from chatretriever.methods.items.build import TRAIN_FILE, BuildConfig, build_items
from chatretriever.methods.items.evaluate import (
    bm25_ranker,
    dense_ranker,
    evaluate_ranker,
    load_test_set,
    results_table,
)
from chatretriever.methods.items.recipe import load_item_recipe, run_item_training
from chatretriever.methods.items.recommend import multi_turn_requests, session_vs_last_turn
from chatretriever.methods.items.schema import schema_of_dir
from chatretriever.methods.items.templates import TASKS
from chatretriever.retrieval.evaluate import write_json

# The helper packages beside this script: on sys.path when the script runs
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _conversational import script  # noqa: E402
from _shared.machine import machine, machine_line  # noqa: E402
from _shared.paths import keep_previous, repo_path, run_settings  # noqa: E402


def _timed(timings: dict[str, float], name: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    out = fn()
    timings[name] = round(time.perf_counter() - start, 1)
    print(f"[{name}] {timings[name]} s", flush=True)
    return out


def _train(args: argparse.Namespace, data_dir: Path, name: str, changes: list[str]) -> Path:
    """Train with the recipe (configs/items-minilm.yaml), its data and output moved here."""
    overrides = [
        f"output_dir={Path(args.out) / 'runs' / name}",
        f"data.files=[{{path: '{data_dir / TRAIN_FILE}'}}]",
        f"training.save_steps={10**6}",  # only the final model: checkpoints cost minutes
        *(f"{key}={value}" for key, value in _recipe_settings(args).items()),
        *changes,
    ]
    return run_item_training(load_item_recipe(args.recipe, overrides))


def _recipe_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe fields this run changes (those given on the command line)."""
    fields = {
        "model": args.model,
        "training.max_steps": args.steps,
        "training.per_device_train_batch_size": args.batch_size,
        "training.learning_rate": args.lr,
        "lora.enabled": True if args.lora else None,
    }
    return {k: v for k, v in fields.items() if v is not None}


def _heatmap(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results)
    tasks = [t for t in TASKS if any(t in r["tasks"] for r in results.values())]
    grid = np.array(
        [[results[n]["tasks"].get(t, {}).get("hit@5", np.nan) for t in tasks] for n in names]
    )  # (systems, tasks)
    fig, ax = plt.subplots(figsize=(1.0 * len(tasks) + 3, 0.6 * len(names) + 1.5))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_yticks(range(len(names)), names)
    for (i, j), v in np.ndenumerate(grid):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(im, ax=ax, label="Hit@5")
    ax.set_title("Item retrieval on Steam: Hit@5 per task")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All stages; returns the results JSON object."""
    data = Path(args.out) / "data"
    timings: dict[str, float] = {}
    config = BuildConfig(
        train_per_task=args.train_per_task,
        test_per_task=args.test_per_task,
        catalog_size=args.catalog_size,
        seed=args.seed,
    )
    counts = _timed(timings, "build", lambda: build_items(load_reclm(args.root), data, config))
    items, sessions, qrels = load_test_set(data)
    results: dict[str, Any] = {}
    titles = {p.id: p.title for p in items}
    conversations = multi_turn_requests(sessions, titles, schema=schema_of_dir(data))

    def evaluate(name: str, make_rank: Callable[[], Any]) -> None:
        rank = make_rank()
        results[name] = evaluate_ranker(rank, items, sessions, qrels, name=name)
        results[name]["multi_turn"] = session_vs_last_turn(rank, conversations, qrels)
        write_json(Path(args.out) / "partial.json", {"timings_s": timings, "results": results})

    _timed(timings, "eval bm25", lambda: evaluate("BM25", lambda: bm25_ranker(items)))
    from chatretriever.retrieval.baselines import TextEmbedder

    recipe = load_item_recipe(args.recipe, [f"{k}={v}" for k, v in _recipe_settings(args).items()])
    # TextEmbedder has one length for queries and items: the longer one (a history query cut
    # short loses its newest titles; items render to ~77 tokens, a little past the trained 64).
    max_len = max(recipe.lengths.query, recipe.lengths.item)

    def embed(path: str) -> Any:
        return dense_ranker(TextEmbedder.from_pretrained(path, max_length=max_len), items)

    base = recipe.model
    _timed(timings, f"eval {base}", lambda: evaluate(base, lambda: embed(base)))
    tuned = f"{base} fine-tuned" + (" (LoRA)" if args.lora else "")
    variants: dict[str, list[str]] = {tuned: []}
    if not args.no_ablation:
        variants[f"{tuned}, in-batch on"] = ["loss.in_batch=true"]
    if args.holdout:
        variants[f"{tuned} without {args.holdout}"] = [f"data.exclude_tasks=[{args.holdout}]"]
    for i, (name, changes) in enumerate(variants.items()):
        run_dir = _timed(
            timings, f"train {name}", lambda c=changes, i=i: _train(args, data, f"v{i}", c)
        )
        _timed(
            timings, f"eval {name}", lambda n=name, d=run_dir: evaluate(n, lambda: embed(str(d)))
        )
    return {
        "counts": counts,
        "timings_s": timings,
        "total_s": round(sum(timings.values()), 1),
        "settings": run_settings(args),
        "machine": machine("float32"),  # the item trainer is fp32 only
        "command": shlex.join(["python", "benchmarks/items.py", *sys.argv[1:]]),
        "results": results,
    }


def write_report(report: dict[str, Any], out: Path) -> None:
    """results.json, results.md and hit5.png (those of other settings kept as *.prev*)."""
    results = report["results"]
    files = [out / "results.json", out / "results.md", out / "hit5.png"]
    keep_previous(files, report.get("settings", {}))
    write_json(out / "results.json", report)
    md = [
        "## Hit@5 per task",
        results_table(results, "hit@5"),
        "",
        "## nDCG@10 per task",
        results_table(results, "nDCG@10"),
        "",
        "## Multi-turn requests (FA2I/UQ2I constraints over 2-3 turns): Hit@5",
        "| system | conversations | whole session | last turn only |",
        "|---|---|---|---|",
        *(
            f"| {n} | {int(r['multi_turn']['conversations'])} | "
            f"{r['multi_turn']['hit@5_session']:.3f} | {r['multi_turn']['hit@5_last_turn']:.3f} |"
            for n, r in results.items()
        ),
        "",
        "## Timings (s)",
        machine_line(report["machine"]) if "machine" in report else "",
        "Settings: "
        + ", ".join(f"{k}={v}" for k, v in report.get("settings", {}).items() if k != "out"),
        "",
        json.dumps(report["timings_s"], indent=1),
        "",
        f"`{report['command']}`" if "command" in report else "",
    ]
    with atomic_write(out / "results.md") as f:
        f.write("\n".join(md) + "\n")
    _heatmap(results, out / "hit5.png")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=repo_path("../shared/data/steam"), help="Steam directory")
    p.add_argument("--out", default=repo_path("outputs/bench-items"))
    p.add_argument("--recipe", default=repo_path("configs/items-minilm.yaml"))
    p.add_argument("--model", default=None, help="the recipe's model unless given")
    p.add_argument("--train-per-task", type=int, default=200)
    p.add_argument("--test-per-task", type=int, default=100)
    p.add_argument("--catalog-size", type=int, default=3000)
    p.add_argument("--steps", type=int, default=None, help="the recipe's unless given")
    p.add_argument("--batch-size", type=int, default=None, help="the recipe's unless given")
    p.add_argument("--lr", type=float, default=None, help="the recipe's unless given")
    p.add_argument("--holdout", default="UQ2I", help="task left out of one run ('' = none)")
    p.add_argument("--no-ablation", action="store_true", help="skip the in-batch-on run")
    p.add_argument(
        "--lora", action="store_true", help="fine-tune LoRA adapters (lora.enabled) instead"
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Bad input as a ValueError / FileNotFoundError naming the option, before any work."""
    for name in ("train_per_task", "test_per_task", "catalog_size", "steps", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.holdout and args.holdout not in TASKS:
        raise ValueError(f"--holdout {args.holdout!r} is none of the tasks {list(TASKS)}")
    if not Path(args.root).is_dir():
        raise FileNotFoundError(f"--root {args.root}: no such directory")
    if not Path(args.recipe).is_file():
        raise FileNotFoundError(f"--recipe {args.recipe}: no such file")
    # the recipe with this run's settings: a bad field fails here, not after minutes of work
    load_item_recipe(args.recipe, [f"{k}={v}" for k, v in _recipe_settings(args).items()])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    check_args(args)
    report = run(args)
    write_report(report, Path(args.out))
    print(results_table(report["results"], "hit@5"))
    print(f"total {report['total_s']} s")
    return 0


if __name__ == "__main__":
    script.run(main)
