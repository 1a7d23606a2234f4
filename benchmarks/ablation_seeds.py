"""Recipes x seeds on MTRAG-UN: train every run not yet trained, search, tabulate mean +- sd.

Each recipe (the shipped recipe and its ablations, say) is trained once per seed, N runs side by
side, each into OUT/runs/<label>-s<seed>; the held-out tasks are then searched with every trained
model (`benchmarks/conversational.py`) and `benchmarks/seeds.py` reports each recipe as mean +- sd
over its seeds, compared (paired, seed-averaged) with the first recipe:

    python benchmarks/ablation_seeds.py --out outputs/ablation-seeds --parallel 3 \\
        --recipe configs/chatretriever-smol.yaml --recipe configs/ablations/no-session-lm.yaml \\
        --recipe configs/ablations/vanilla-it.yaml --seeds 42 1 2 \\
        --data ../shared/data/mtrag --eval-conversations configs/mtrag-un-heldout.txt --bm25

A run whose directory holds its saved model is never trained again, and an interrupted one resumes
from its newest checkpoint (`chatretriever train --resume`), so the job can be spread over several
sessions or machines: `--train-only` where the GPU is, `--runs-only` (search, no scoring: torch
and transformers suffice) wherever the models are, and the table where ir_measures is. Training logs
go to OUT/logs/<run>.log. Each evaluation (the conversations file and `--pool`) has its own
directory, OUT/eval.<conversations stem or all>[.pool<P>]: the search there (`conversational.py`'s
runs and embeddings) and the table, seeds.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from chatretriever.io.atomic import atomic_write
from chatretriever.modeling.recipe import SAVED_RECIPE, apply_overrides, read_recipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
import conversational  # noqa: E402
import seeds  # noqa: E402
from _conversational import script  # noqa: E402
from _shared.paths import repo_path  # noqa: E402

FINISHED = "chatretriever.json"  # written into the run directory when training has ended
CONFIG = ".config.json"  # OUT/runs/<run>.config.json: the training config a run was made with
# settings of logging, checkpoints and data loading: a run that differs only in them is the same
UNCOMPARED = frozenset(
    f"training.{k}"
    for k in ("logging_steps", "save_steps", "save_total_limit", "dataloader_num_workers")
)


@dataclass(frozen=True)
class Job:
    label: str  # the recipe's label: one row of the table
    recipe: Path
    seed: int
    out: Path  # OUT/runs/<label>-s<seed>

    @property
    def name(self) -> str:
        return self.out.name

    @property
    def finished(self) -> bool:
        return (self.out / FINISHED).is_file()

    @property
    def config_file(self) -> Path:
        return self.out.with_name(self.out.name + CONFIG)


def parse_recipe(spec: str) -> tuple[str, Path]:
    """ "[LABEL=]RECIPE.yaml" -> (label, path); the label defaults to the file's stem."""
    label, sep, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
    recipe = Path(path)
    if not recipe.is_file():
        raise FileNotFoundError(f"--recipe {spec!r}: no such file {recipe}")
    label = label.strip() if sep else recipe.stem
    if not label or "/" in label:
        raise ValueError(f"--recipe {spec!r}: a label must be non-empty, without '/'")
    return label, recipe


def plan(recipes: Sequence[str], seed_list: Sequence[int], out: Path) -> list[Job]:
    """Every (recipe, seed) run, recipe by recipe; labels must differ."""
    parsed = [parse_recipe(r) for r in recipes]
    labels = [label for label, _ in parsed]
    if len(set(labels)) != len(labels):
        raise ValueError(f"recipe labels must differ, got {labels} (name them: LABEL=RECIPE)")
    if len(set(seed_list)) != len(seed_list):
        raise ValueError(f"--seeds must differ, got {list(seed_list)}")
    return [
        Job(label, recipe, seed, out / "runs" / f"{label}-s{seed}")
        for label, recipe in parsed
        for seed in seed_list
    ]


def run_sets(job: Job, overrides: Sequence[str]) -> list[str]:
    """The `--set`s of one run: its seed and directory, then the overrides of every run."""
    return [f"training.seed={job.seed}", f"output_dir={job.out}", *overrides]


def train_command(job: Job, overrides: Sequence[str]) -> list[str]:
    """`chatretriever train` for one run: its seed and directory over the recipe, resumable."""
    sets = run_sets(job, overrides)
    return [
        sys.executable, "-m", "chatretriever", "train", str(job.recipe), "--resume",
        *(a for s in sets for a in ("--set", s)),
    ]  # fmt: skip


def training_config(job: Job, overrides: Sequence[str]) -> dict:
    """The run's training config: its recipe (with `base:`) under the `--set`s and its seed, as
    `train_command` asks for it; output_dir left out (OUT may move)."""
    config = apply_overrides(read_recipe(job.recipe), run_sets(job, overrides))
    config.pop("output_dir", None)
    return json.loads(json.dumps(config, default=str))


def _leaves(tree: object, prefix: str = "") -> dict[str, object]:
    """{"training.max_steps": 2, ...}: the scalar or list values of a nested mapping."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, object] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_changes(job: Job, wanted: dict) -> list[str]:
    """How the config `job` was trained with differs from `wanted` ("key: old -> new" each);
    [] when they agree (but for `UNCOMPARED` keys) or nothing was trained there. A run trained
    before configs were recorded is compared on the scalar values of `wanted` against its saved
    train_config.yaml."""
    if not job.out.exists():
        return []
    new = _leaves(wanted)
    if job.config_file.is_file():
        old = _leaves(json.loads(job.config_file.read_text())["config"])
    elif (job.out / SAVED_RECIPE).is_file():
        saved = _leaves(read_recipe(job.out / SAVED_RECIPE))
        old = {k: saved.get(k) for k, v in new.items() if not isinstance(v, list | dict)}
        new = {k: new[k] for k in old}
    else:
        return []
    missing = "-"
    return [
        f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
        for k in sorted((set(old) | set(new)) - UNCOMPARED)
        if old.get(k, missing) != new.get(k, missing)
    ]


def check_configs(jobs: Sequence[Job], overrides: Sequence[str], retrain: bool) -> None:
    """Records each run's training config (OUT/runs/<run>.config.json) before it trains; a run
    already there with another config is refused (ValueError naming it and the differing keys),
    or with `retrain` moved aside to <run>.replaced[-N] and trained again."""
    wanted = {job: training_config(job, overrides) for job in jobs}
    stale = {job: changes for job in jobs if (changes := config_changes(job, wanted[job]))}
    if stale and not retrain:
        job, changes = next(iter(stale.items()))
        more = f" (and {len(stale) - 1} more runs)" if len(stale) > 1 else ""
        raise ValueError(
            f"run {job.name} ({job.out}) was trained with another config{more}: "
            f"{'; '.join(changes)}; pass --retrain to train it again (the old run is kept "
            "aside), or choose another --out"
        )
    for job in stale:
        aside, n = job.out.with_name(job.name + ".replaced"), 1
        while aside.exists():
            n += 1
            aside = job.out.with_name(f"{job.name}.replaced-{n}")
        job.out.rename(aside)
        if job.config_file.is_file():
            job.config_file.rename(aside.with_name(aside.name + CONFIG))
        print(f"{job.name}: trained with another config, moved to {aside}; training it again")
    for job in jobs:
        record = {"recipe": str(job.recipe), "config": wanted[job]}
        job.config_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(job.config_file) as f:
            json.dump(record, f, indent=1)


def train(jobs: Sequence[Job], overrides: Sequence[str], parallel: int, logs: Path) -> list[str]:
    """Trains the unfinished runs, `parallel` at a time; returns one line per failed run.

    Interrupted (Ctrl-C, or SIGTERM to this process), it stops the trainings it started before it
    stops itself: a run resumes from its newest checkpoint next time."""
    todo = [j for j in jobs if not j.finished]
    print(f"{len(jobs) - len(todo)} of {len(jobs)} runs already trained; {len(todo)} to train")
    if not todo:
        return []
    logs.mkdir(parents=True, exist_ok=True)
    running: set[subprocess.Popen] = set()
    lock = threading.Lock()
    stopping = threading.Event()

    def one(job: Job) -> str | None:
        log = logs / f"{job.name}.log"  # appended to: a resumed run keeps its earlier attempts
        with lock:
            if stopping.is_set():
                return f"{job.name}: not started (interrupted)"
            with open(log, "a") as f:
                proc = subprocess.Popen(
                    train_command(job, overrides), stdout=f, stderr=subprocess.STDOUT
                )
            running.add(proc)
        rc = proc.wait()
        with lock:
            running.discard(proc)
        if rc == 0 and job.finished:
            return None
        lines = log.read_text(errors="replace").strip().splitlines()
        return f"{job.name}: exit {rc}, {lines[-1] if lines else 'no output'} (log: {log})"

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, interrupt) if main_thread else None
    failures = []
    pool = ThreadPoolExecutor(max_workers=max(1, parallel))
    try:
        bar = tqdm(pool.map(one, todo), total=len(todo), desc="train", unit="run")
        for failure in bar:
            if failure:
                failures.append(failure)
                tqdm.write(f"failed: {failure}")
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)  # no new run starts
        with lock:
            stopping.set()
            for proc in running:
                proc.terminate()
        print(f"interrupted: {len(running)} trainings stopped", file=sys.stderr)
        raise
    finally:
        pool.shutdown(wait=True)
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return failures


def eval_dir(args: argparse.Namespace) -> Path:
    """OUT/eval.<conversations>[.pool<P>]: one directory per set of evaluated tasks and corpus."""
    tasks = Path(args.eval_conversations).stem if args.eval_conversations else "all"
    return args.out / (f"eval.{tasks}" + (f".pool{args.pool}" if args.pool else ""))


def search(jobs: Sequence[Job], args: argparse.Namespace) -> Path:
    """Runs of every trained model (and BM25 on the last turn with --bm25); their directory."""
    bench = eval_dir(args) / "bench"
    argv = ["--data", args.data, "--out", str(bench), "--runs-only"]
    argv += ["--systems", "chatretriever", *(["bm25"] if args.bm25 else [])]
    for job in jobs:
        argv += ["--model", f"{job.name}={job.out}"]
    for flag, value in (
        ("--eval-conversations", args.eval_conversations),
        ("--pool", args.pool),
        ("--device", args.device),
        ("--batch-size", args.batch_size),
    ):
        if value is not None:
            argv += [flag, str(value)]
    conversational.main(argv)
    pattern = "runs" if not args.pool else f"runs.pool{args.pool}-*"
    found = sorted(bench.glob(pattern))
    if len(found) != 1:
        raise ValueError(f"{bench}: expected one {pattern} directory, found {found}")
    return found[0]


def tabulate(jobs: Sequence[Job], runs_dir: Path, args: argparse.Namespace) -> None:
    """seeds.py over the runs: one group per recipe (its seeds in the order given)."""
    argv = ["--data", args.data, "--out", str(eval_dir(args)), "--title", args.title]
    if args.eval_conversations:
        argv += ["--eval-conversations", args.eval_conversations]
    for label in dict.fromkeys(j.label for j in jobs):
        files = [str(runs_dir / f"{j.name}.session.trec") for j in jobs if j.label == label]
        argv += ["--group", f"{label}={','.join(files)}"]
    if args.bm25:
        argv += ["--run", f"BM25, last turn={runs_dir / 'bm25.last_turn.trec'}"]
    seeds.main(argv)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", action="append", required=True, metavar="[LABEL=]RECIPE",
                   help="a recipe YAML (repeatable); the first is the reference row")  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=[42, 1, 2])
    p.add_argument("--out", type=Path, default=Path(repo_path("outputs/ablation-seeds")))
    p.add_argument("--parallel", type=int, default=1, help="runs trained side by side")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override every recipe (as `chatretriever train --set`)")  # fmt: skip
    p.add_argument("--retrain", action="store_true",
                   help="retrain runs made with another config (moved aside first)")  # fmt: skip
    p.add_argument("--train-only", action="store_true", help="train, then stop")
    p.add_argument("--runs-only", action="store_true", help="train and search; no scoring")
    p.add_argument("--data", default=repo_path("../shared/data/mtrag"), help="the MTRAG directory")
    p.add_argument("--eval-conversations", metavar="FILE", help="conversation ids to evaluate")
    p.add_argument("--pool", type=int, help="search a pooled corpus (see conversational.py)")
    p.add_argument("--device", help="cpu, cuda, ... (default: the accelerator, else cpu)")
    p.add_argument("--batch-size", type=int, help="passages per encoder call")
    p.add_argument("--bm25", action="store_true", help="add BM25 on the last turn as a row")
    p.add_argument("--title", default="Recipes x seeds", help="heading of seeds.md")
    args = p.parse_args(argv)
    # the search and scoring options too, before hours of training
    if args.parallel < 1:
        p.error("--parallel must be positive")
    if args.pool is not None and args.pool < 0:
        p.error("--pool must be 0 or more")
    if args.batch_size is not None and args.batch_size < 1:
        p.error("--batch-size must be positive")
    if any(not 0 <= s < 2**32 for s in args.seeds):
        p.error("--seeds must be in [0, 2**32)")
    if args.eval_conversations and not Path(args.eval_conversations).is_file():
        p.error(f"--eval-conversations {args.eval_conversations}: no such file")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    jobs = plan(args.recipe, args.seeds, args.out)
    check_configs(jobs, args.set, args.retrain)
    try:
        failures = train(jobs, args.set, args.parallel, args.out / "logs")
    except KeyboardInterrupt:
        return 130
    if failures:
        print(f"{len(failures)} runs failed:\n" + "\n".join(failures), file=sys.stderr)
        return 1
    if args.train_only:
        return 0
    runs_dir = search(jobs, args)
    if not args.runs_only:
        tabulate(jobs, runs_dir, args)
    return 0


if __name__ == "__main__":
    script.run(main)
