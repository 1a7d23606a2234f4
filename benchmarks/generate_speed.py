"""Batched generation speed on CPU: prompts read alone into one static cache against the
left-padded batch, on real MTRAG grounded-answer prompts.

Prompts are MTRAG tasks (`reference.jsonl`) with their reference `contexts` as the passages,
built and fitted by `GroundedGenerator` itself (`grounded_messages`, `encode_prompts`), so their
lengths vary as those of real answers do; they are sorted longest first and cut into batches, as
`GroundedGenerator.generate_ids` does. For every batch and round both paths run, interleaved
(which one goes first alternates), greedy, through `model.generate`:

    padded      `left_padded(...)`: what batched generation did before (the baseline)
    prefilled   `prefilled_generate_inputs(...)`: each prompt read alone into a static cache
                (building those inputs is part of its time)

and the rows whose new tokens are identical on both paths are counted (float32: all of them).

    python benchmarks/generate_speed.py                       # 3 batches of 16, 2 rounds
    python benchmarks/generate_speed.py --dtype float32 --threads 1

Writes OUT/generate_speed.{json,md} (the table: _generate_speed/report.py); those of a run with
other options are kept as OUT/generate_speed.prev[-N].*.
"""

from __future__ import annotations

import argparse
import os
import random
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from chatretriever.io.atomic import atomic_write
from chatretriever.io.files import iter_jsonl
from chatretriever.io.mtrag import mtrag_session
from chatretriever.retrieval.evaluate import write_json

# The helper packages beside this script (on sys.path when the script runs)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _conversational.script import run  # noqa: E402
from _generate_speed.report import PATHS, markdown, prompt_stats, summarize  # noqa: E402
from _shared.machine import machine  # noqa: E402
from _shared.options import at_least  # noqa: E402
from _shared.paths import keep_previous, repo_path, require_model, run_settings  # noqa: E402


def grounded_tasks(data: str, n: int, seed: int, passages: int) -> list[tuple[Any, list[str]]]:
    """n MTRAG tasks that have reference passages, drawn at random (seeded).

    Args:
        data: The MTRAG directory (holding mtrag-un/reference.jsonl) or the directory of
            reference.jsonl itself.
        n: Tasks wanted.
        seed: Seeds the draw.
        passages: The most reference passages kept per task (the first ones).

    Returns:
        (session, passage texts) per task: the reference `contexts`, in their order.
    """
    root = Path(data)
    path = next(
        (
            d / "reference.jsonl"
            for d in (root, root / "mtrag-un")
            if (d / "reference.jsonl").is_file()
        ),
        None,
    )
    if path is None:
        raise FileNotFoundError(f"--data {data}: no reference.jsonl here or in mtrag-un/")
    tasks = []
    for line, obj in iter_jsonl(path):
        texts = [c.get("text") or "" for c in obj.get("contexts") or []]
        texts = [t for t in texts if t.strip()][:passages]
        if texts:
            tasks.append((mtrag_session(obj, path, line), texts))
    if len(tasks) < n:
        raise SystemExit(f"{path}: {len(tasks)} tasks with contexts, {n} wanted")
    random.Random(seed).shuffle(tasks)
    return tasks[:n]


def prompt_batches(gen: Any, tasks: Sequence[tuple[Any, list[str]]], size: int) -> list[list]:
    """The tasks' prompt ids as `GroundedGenerator` builds and fits them, longest first, in
    batches of `size` (as `generate_ids` forms its batches)."""
    from chatretriever.modeling.grounded import grounded_messages

    ids = gen.encode_prompts([grounded_messages(s.turns, texts) for s, texts in tasks])
    ids.sort(key=len, reverse=True)
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def timed_generate(gen: Any, batch: list, path: str, max_new_tokens: int) -> tuple[list, float]:
    """Greedy `model.generate` on one batch by one path; returns (new ids per row, seconds),
    the time including building the inputs."""
    import torch

    from chatretriever.modeling.generate_batching import left_padded, prefilled_generate_inputs

    model, pad = gen.model, gen.tokenizer.pad_token_id
    pad = gen.tokenizer.eos_token_id if pad is None else pad
    start = time.perf_counter()
    with torch.inference_mode():
        if path == "padded":
            inputs = left_padded(batch, pad, model.device)
        else:
            inputs = prefilled_generate_inputs(model, batch, pad, max_new_tokens)
            if inputs is None:
                raise SystemExit("this model keeps the padded path (no prefilled inputs for it)")
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            use_cache=True,
        )  # (B, T + T_new)
    seconds = time.perf_counter() - start
    return out[:, inputs["input_ids"].shape[1] :].tolist(), seconds


def answer_tokens(rows: Sequence[Sequence[int]], stops: set[int]) -> int:
    """New tokens of the rows up to each one's first stop token (the answer `_batch_ids` keeps)."""
    return sum(next((i for i, t in enumerate(r) if t in stops), len(r)) for r in rows)


def measure(gen: Any, batches: list[list], args: argparse.Namespace) -> dict[str, Any]:
    """Both paths on every batch and round, interleaved; times, tokens and identical rows."""
    from chatretriever.modeling.grounded import _stop_ids  # how answers are cut at eos

    stops = _stop_ids(gen.model, gen.tokenizer)
    for path in PATHS:  # one-off costs (allocator, kernels) kept out of the first timing
        timed_generate(gen, [batches[0][-1]], path, 2)
    runs: list[dict[str, Any]] = []
    total = len(batches) * args.rounds * len(PATHS)
    with tqdm(total=total, desc="generate", unit="call") as bar:
        for r in range(args.rounds):
            for b, batch in enumerate(batches):
                # Which path goes first alternates: a load change hits both alike.
                order = PATHS if (r * len(batches) + b) % 2 == 0 else PATHS[::-1]
                rec: dict[str, Any] = {
                    "round": r,
                    "batch": b,
                    "rows": len(batch),
                    "first": order[0],
                }
                new = {}
                for path in order:
                    new[path], seconds = timed_generate(gen, batch, path, args.max_new_tokens)
                    rec[f"{path}_s"] = round(seconds, 3)
                    rec[f"{path}_tokens"] = answer_tokens(new[path], stops)
                    bar.set_postfix(batch=b, round=r, path=path, s=f"{seconds:.1f}")
                    bar.update(1)
                rec["identical_rows"] = sum(a == p for a, p in zip(*new.values(), strict=True))
                rec["ratio"] = round(rec["padded_s"] / rec["prefilled_s"], 3)
                runs.append(rec)
    return summarize(runs, len(batches))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--data", default=repo_path("../shared/data/mtrag"), help="the MTRAG directory")
    p.add_argument("--out", default=repo_path("outputs/generate_speed"), help="output directory")
    p.add_argument("--model", default="smollm2-135m-instruct", help="causal chat LLM")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bf16", "float32"),
        help="weights: auto (bf16 where the CPU runs it natively, as --gen-dtype), bf16, float32",
    )
    p.add_argument("--batch-size", type=at_least(1), default=16, help="prompts per generate call")
    p.add_argument("--batches", type=at_least(1), default=3, help="batches of prompts")
    p.add_argument("--max-new-tokens", type=at_least(1), default=64)
    p.add_argument("--rounds", type=at_least(1), default=2, help="times every batch is timed")
    p.add_argument("--threads", type=at_least(1), help="torch threads (default: torch's)")
    p.add_argument(
        "--passages", type=at_least(1), default=3, help="reference passages per prompt (rag.py's k)"
    )
    p.add_argument("--seed", type=int, default=0, help="which MTRAG tasks are drawn")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    require_model(args.model)  # before the data loads
    import torch
    import transformers

    from chatretriever.modeling.grounded import GroundedGenerator
    from chatretriever.modeling.precision import dtype_name

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = dtype_name(args.dtype, "cpu")  # "auto" -> bf16 or float32 on this CPU
    info = machine(dtype)  # first: the load average before this process works
    info.update(
        transformers=transformers.__version__,
        loadavg_1_5_15=[round(x, 2) for x in os.getloadavg()],
    )
    tasks = grounded_tasks(args.data, args.batch_size * args.batches, args.seed, args.passages)
    # the prefilled path is a CPU path (it returns None elsewhere): measured on the CPU
    gen = GroundedGenerator.from_pretrained(
        args.model,
        "cpu",
        dtype=None if dtype == "float32" else dtype,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    batches = prompt_batches(gen, tasks, args.batch_size)
    measured = measure(gen, batches, args)
    info["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "command": shlex.join(["python", "benchmarks/generate_speed.py", *argv]),
        "settings": run_settings(args),
        "dtype": dtype,
        "machine": info,
        "prompt_tokens": prompt_stats(batches),
        "task_ids": [s.id for s, _ in tasks],
        "measured": measured,
    }
    out = Path(args.out)
    keep_previous([out / "generate_speed.json", out / "generate_speed.md"], result["settings"])
    write_json(out / "generate_speed.json", result)
    text = markdown(result)
    with atomic_write(out / "generate_speed.md") as f:
        f.write(text)
    print(text)
    print(f"-> {out / 'generate_speed'}.{{json,md}}")
    return 0


if __name__ == "__main__":
    run(main)
