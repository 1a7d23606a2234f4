"""Seed-averaged comparisons on MTRAG-UN: mean +- sd over the runs of each configuration.

A configuration trained with several seeds gives one TREC run per seed (for example the runs that
`benchmarks/conversational.py` wrote for each seed's model). This script scores every run on the
chosen conversations, reports each configuration as mean +- sd over its seeds (and each seed's
value), and compares each configuration with a reference one, paired over the judged tasks: the
per-task value averaged over a configuration's seeds, tested with the paired randomisation test of
`chatretriever.retrieval.evaluate.compare`. Single runs (`--run`, e.g. BM25 or a shipped model)
are shown beside them.

    python benchmarks/seeds.py --data ../shared/data/mtrag \\
        --eval-conversations configs/mtrag-un-heldout.txt --out outputs/seeds \\
        --group "v1 recipe=runs/v1-s*.trec" --group "alpha 0=runs/alpha0-s*.trec" \\
        --reference "v1 recipe" --run "BM25, last turn=runs/bm25.last_turn.trec"

A group's runs are a glob (quote it) or a comma-separated list. Writes OUT/seeds.json,
OUT/seeds.md and OUT/seeds.png (each seed a dot, the mean a bar with its sd); those of a run with
other options are kept as OUT/seeds.prev[-N].*.
"""

from __future__ import annotations

import argparse
import glob
import shlex
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chatretriever.io.atomic import atomic_write
from chatretriever.io.mtrag import load_mtrag
from chatretriever.io.trec import read_run
from chatretriever.retrieval.evaluate import Evaluation, compare, evaluate_run, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _conversational import script, tasks  # noqa: E402
from _conversational.report import (  # noqa: E402
    MEASURES,
    delta_cell,
    pyplot,
    save_figure,
    table_head,
)
from _shared.machine import machine, machine_line  # noqa: E402
from _shared.paths import keep_previous, repo_path, run_settings  # noqa: E402


def parse_spec(spec: str, what: str) -> tuple[str, list[Path]]:
    """ "LABEL=GLOB_OR_LIST" -> (label, the run files, sorted); a glob must match something."""
    label, sep, files = spec.partition("=")
    if not sep or not label.strip() or not files.strip():
        raise ValueError(f"{what} {spec!r}: expected LABEL=FILES")
    paths: list[Path] = []
    for part in files.split(","):
        matched = sorted(glob.glob(part.strip()))
        if not matched:
            raise FileNotFoundError(f"{what} {label!r}: no run file matches {part.strip()!r}")
        paths.extend(Path(p) for p in matched)
    return label.strip(), paths


def mean_evaluation(evaluations: Sequence[Evaluation]) -> Evaluation:
    """The per-task values averaged over the seeds (the same judged tasks in each)."""
    qids = sorted(evaluations[0].per_query)
    for ev in evaluations[1:]:
        if sorted(ev.per_query) != qids:
            raise ValueError("the runs of a group were scored on different tasks")
    names = list(evaluations[0].aggregate)
    per_query = {
        q: {m: float(np.mean([ev.per_query[q][m] for ev in evaluations])) for m in names}
        for q in qids
    }
    aggregate = {m: float(np.mean([per_query[q][m] for q in qids])) for m in names}
    return Evaluation(aggregate=aggregate, per_query=per_query)


def summarize(label: str, paths: Sequence[Path], qrels: Any) -> tuple[dict, Evaluation]:
    """One row: each run's metrics, mean and sd over them (sd 0 for a single run)."""
    evaluations = [evaluate_run(read_run(p), qrels, MEASURES) for p in paths]
    missing = [len(ev.missing_from_run) for ev in evaluations]
    for path, n in zip(paths, missing, strict=True):
        if n:  # scored 0 on them: an interrupted search, or a run of other tasks
            print(
                f"warning: {path} lacks {n} of the {evaluations[0].num_queries} evaluated "
                "tasks (scored 0 on them)",
                file=sys.stderr,
            )
    row: dict[str, Any] = {
        "label": label,
        "runs": [str(p) for p in paths],
        "num_missing_from_run": missing,
        "n": len(paths),
        "per_run": [ev.aggregate for ev in evaluations],
        "mean": {},
        "sd": {},
    }
    for m in MEASURES:
        values = [ev.aggregate[m] for ev in evaluations]
        row["mean"][m] = float(np.mean(values))
        row["sd"][m] = statistics.stdev(values) if len(values) > 1 else 0.0
    row["num_queries"] = evaluations[0].num_queries
    return row, mean_evaluation(evaluations)


def table(rows: Sequence[dict], reference: str | None) -> str:
    lines = table_head(["system", "seeds"], ["nDCG@3 per seed"], reference)
    for r in rows:
        cells = [r["label"], str(r["n"])]
        for m in MEASURES:
            sd = f" ± {r['sd'][m]:.4f}" if r["n"] > 1 else ""
            cells.append(f"{r['mean'][m]:.4f}{sd}")
        cells.append(" / ".join(f"{v['nDCG@3']:.4f}" for v in r["per_run"]))
        test = r.get("vs_reference", {}).get("nDCG@3")
        cells.append("reference" if r["label"] == reference else delta_cell(test))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_plot(path: Path, rows: Sequence[dict]) -> bool:
    """nDCG@3 per configuration: each seed a dot, the mean a bar, the sd an error bar."""
    if (plt := pyplot()) is None:
        return False
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.5 * len(rows)))
    means = [r["mean"]["nDCG@3"] for r in rows]
    sds = [r["sd"]["nDCG@3"] for r in rows]
    ax.barh(y, means, 0.6, xerr=sds, color="#9ecae1", ecolor="#08519c", capsize=4)
    for i, r in enumerate(rows):
        values = [v["nDCG@3"] for v in r["per_run"]]
        ax.plot(values, [i] * len(values), "o", color="#08519c", markersize=4)
    ax.set_yticks(y, [r["label"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("nDCG@3 (dots: seeds; bar: mean; whisker: sd)")
    lo = min(min(v["nDCG@3"] for v in r["per_run"]) for r in rows)
    ax.set_xlim(
        max(0.0, lo - 0.1), min(1.0, max(m + s for m, s in zip(means, sds, strict=True)) + 0.05)
    )
    save_figure(plt, fig, path)
    return True


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--data", default=repo_path("../shared/data/mtrag"), help="the MTRAG directory")
    p.add_argument("--eval-conversations", metavar="FILE", help="conversation ids to evaluate")
    p.add_argument("--group", action="append", default=[], metavar="LABEL=RUNS", required=True)
    p.add_argument("--run", action="append", default=[], metavar="LABEL=RUN", help="single run")
    p.add_argument("--reference", help="label of the group the others are compared with")
    p.add_argument("--title", default="Seed-averaged comparison", help="heading of seeds.md")
    p.add_argument("--out", default=repo_path("outputs/seeds"), help="output directory")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    specs = [parse_spec(s, "--group") for s in args.group]
    specs += [parse_spec(s, "--run") for s in args.run]
    labels = [label for label, _ in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must differ, got {labels}")
    reference = args.reference or specs[0][0]
    if reference not in labels:
        raise ValueError(f"--reference {reference!r} is none of the labels {labels}")
    data = load_mtrag(args.data)
    sessions, qrels = data.sessions, data.qrels
    if args.eval_conversations:
        convs = tasks.read_conversations(args.eval_conversations)
        sessions, qrels = tasks.restrict(sessions, qrels, convs, args.eval_conversations)
    rows, means = [], {}
    for label, paths in specs:
        row, means[label] = summarize(label, paths, qrels)
        rows.append(row)
    for row in rows:
        if row["label"] != reference:
            row["vs_reference"] = compare(means[reference], means[row["label"]])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/seeds.py", *argv])
    summary = {
        "command": command,
        "data": args.data,
        "eval_conversations": args.eval_conversations,
        "tasks": len(sessions),
        "queries_evaluated": rows[0]["num_queries"],
        "reference": reference,
        "measures": list(MEASURES),
        "num_missing_from_run": sum(sum(r["num_missing_from_run"]) for r in rows),
        "machine": machine(torch_used=False),  # scoring only: no torch
        "settings": run_settings(args),
        "rows": rows,
    }
    keep_previous([out / f"seeds.{ext}" for ext in ("json", "md", "png")], summary["settings"])
    write_json(out / "seeds.json", summary)
    md = table(rows, reference)
    text = [
        f"# {args.title}",
        "",
        f"{rows[0]['num_queries']} judged tasks"
        + (f" of the conversations in {args.eval_conversations}" if args.eval_conversations else "")
        + "; mean ± sd over each configuration's seeds (sample sd); Δ: the per-task value "
        "averaged over the seeds, paired randomisation test (10,000 sign flips).",
        "",
        md,
        "",
        *(
            [f"Runs lacking evaluated tasks (scored 0 on them): {summary['num_missing_from_run']}"]
            if summary["num_missing_from_run"]
            else []
        ),
        machine_line(summary["machine"]),
        "",
        f"`{command}`",
        "",
    ]
    with atomic_write(out / "seeds.md") as f:
        f.write("\n".join(text))
    write_plot(out / "seeds.png", rows)
    print(md)
    print(f"-> {out / 'seeds'}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    script.run(main)
