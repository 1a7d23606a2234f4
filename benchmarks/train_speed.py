"""Training-step speed and memory: the one-pass CSIT step against a two-pass step, bf16 and fp32.

One-pass (ours): one forward over [session, EMB x t, response] gives both the session
embedding (the session rows are causal) and the session-masked LM loss L_S; the passages
(positive + hard negatives) have their own forward. Two-pass (the reference code's way): the same,
plus a second forward of the session alone for its embedding. Both run the full step (forward,
L_C + alpha * L_S, backward, AdamW) with LoRA on the same batches of real training examples.

Each (mode, dtype) runs in a fresh process, so its peak memory is its own: peak RSS on CPU (the
whole process, model included), peak allocated memory on a GPU. Tokens/s counts the real
(non-pad) tokens of the CSIT and passage batches, the same for both modes.

A single configuration can be timed on its own with `--child '<json>'` (the keys `measure`
reads); `--modes` limits the run to some of the modes. Writes OUT/train_speed.{json,md,png};
those of a run with other options are kept as OUT/train_speed.prev[-N].*.

    python benchmarks/train_speed.py                                  # SmolLM2, MTRAG examples
    python benchmarks/train_speed.py --steps 2 --warmup 1 --batch-size 2   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chatretriever.io.atomic import atomic_path, atomic_write
from chatretriever.retrieval.evaluate import write_json

# The helper package beside this script (on sys.path when the script runs)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _conversational.script import run  # noqa: E402
from _shared.machine import cpu_model  # noqa: E402
from _shared.options import at_least  # noqa: E402
from _shared.paths import keep_previous, repo_path, require_model, run_settings  # noqa: E402

MODES = ("one_pass", "two_pass")
DEFAULT_DATA = repo_path("outputs/train/mtrag.jsonl.gz")


# ------------------------------------------------------------------------------ one measurement
def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    """Runs warmup + timed training steps of one (mode, dtype) in this process."""
    import torch

    from chatretriever.config import LoraSettings, LossConfig
    from chatretriever.methods.chatretriever.model import ChatRetriever
    from chatretriever.methods.chatretriever.train import csit_losses, make_collator
    from chatretriever.modeling.collate import encode_batch

    torch.manual_seed(0)
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    retriever = ChatRetriever.from_pretrained(
        cfg["model"],
        lora=LoraSettings(r=16, alpha=32, dropout=0.0),
        dtype=cfg["dtype"],
        max_session_len=cfg["max_session_len"],
        max_passage_len=cfg["max_passage_len"],
        max_response_len=cfg["max_response_len"],
        device=cfg["device"],
    )
    retriever.train()
    loss_cfg = LossConfig(n_hard_negatives=cfg["negatives"])
    collate = make_collator(retriever, loss_cfg, "session")
    n_steps, bs = cfg["warmup"] + cfg["steps"], cfg["batch_size"]
    examples = training_examples(cfg)
    params = [p for p in retriever.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    cuda = retriever.device.type == "cuda"
    times, tokens, losses = [], [], []
    for step in range(n_steps):
        batch_examples = examples[step * bs : (step + 1) * bs]
        batch = collate(batch_examples)
        n_tok = int(batch["sessions"]["attention_mask"].sum())
        n_tok += int(batch["passages"]["attention_mask"].sum())
        plain = None
        if cfg["mode"] == "two_pass":
            ids = [retriever.template.session_ids(collate.messages(ex)) for ex in batch_examples]
            plain = encode_batch(ids, retriever.pad_id, retriever.padding_side)
        if step == cfg["warmup"] and cuda:
            torch.cuda.reset_peak_memory_stats()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = retriever(sessions=batch["sessions"], passages=batch["passages"])
        if plain is not None:
            out["session_emb"] = retriever.embed(plain)  # the second pass over the session
        parts = csit_losses(out, batch, loss_cfg)
        loss = sum(parts.values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if step >= cfg["warmup"]:
            times.append(time.perf_counter() - start)
            tokens.append(n_tok)
            losses.append(float(loss))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    return {
        "mode": cfg["mode"],
        "dtype": str(retriever.compute_dtype).removeprefix("torch."),
        "requested_dtype": cfg["dtype"],
        "device": str(retriever.device),
        "steps": len(times),
        "seconds_per_step": sum(times) / len(times),
        "tokens_per_s": sum(tokens) / sum(times),
        "peak_rss_mib": round(peak_rss, 1),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
        "first_loss": losses[0],
    }


def training_examples(cfg: dict[str, Any]) -> list:
    """The (warmup + steps) x batch_size examples the steps use: the first ones with a target and
    at least `negatives` hard negatives; a ValueError (DataFormatError) when there are fewer."""
    from chatretriever.io.training import iter_training_examples

    need = (cfg["warmup"] + cfg["steps"]) * cfg["batch_size"]
    examples = []
    for ex in iter_training_examples(cfg["data"]):
        if ex.target_text and len(ex.negatives) >= cfg["negatives"]:
            examples.append(ex)
        if len(examples) == need:
            return examples
    raise ValueError(
        f"{cfg['data']}: {len(examples)} examples with a target and "
        f">= {cfg['negatives']} negatives, need {need}"
    )


def matmul_ms(dtype_name: str, repeats: int = 5) -> float:
    """Milliseconds of one (512 x 576) @ (576 x 1536) matmul on the CPU: SmolLM2's MLP shape."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(512, 576).to(dtype), torch.randn(576, 1536).to(dtype)
    a @ b  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return (time.perf_counter() - start) / repeats * 1000


def bf16_unsupported(device: str | None) -> str | None:
    """Why a bf16 step is not measured on this machine (a CPU without native bf16), else None."""
    import torch

    from chatretriever.modeling.backbones import default_device
    from chatretriever.modeling.precision import resolve_dtype

    dev = torch.device(device) if device else default_device()
    if resolve_dtype("auto", dev) == torch.bfloat16:
        return None
    fp32, bf16 = matmul_ms("float32"), matmul_ms("bfloat16", repeats=1)
    return (
        f"this {dev.type} has no native bf16 (no AMX / AVX512-BF16): one bf16 matmul of the "
        f"model's MLP shape takes {bf16:.0f} ms against {fp32:.1f} ms in fp32 "
        f"({bf16 / fp32:.0f}x slower), so a bf16 training step would take minutes; "
        "`auto` precision trains in fp32 here. Pass --force-bf16 to time it anyway."
    )


def run_child(cfg: dict[str, Any]) -> dict[str, Any]:
    """`measure` in a fresh Python process (its own peak memory)."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg)],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no message"]
        why = tail[0].removeprefix("error: ")
        raise SystemExit(f"error: train_speed: {cfg['mode']}/{cfg['dtype']} failed: {why}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------ report
def add_ratios(rows: list[dict[str, Any]]) -> None:
    """speedup_vs_two_pass (same dtype) and speedup_vs_fp32 (same mode), from this run."""
    by = {(r["mode"], r["requested_dtype"]): r for r in rows}
    for r in rows:
        two = by.get(("two_pass", r["requested_dtype"]))
        fp32 = by.get((r["mode"], "fp32"))
        r["speedup_vs_two_pass"] = r["tokens_per_s"] / two["tokens_per_s"] if two else None
        r["speedup_vs_fp32"] = r["tokens_per_s"] / fp32["tokens_per_s"] if fp32 else None


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# Training-step speed: one-pass CSIT vs two-pass",
        "",
        f"`{result['command']}`",
        "",
        f"Model {s['model']}, batch {s['batch_size']}, {s['negatives']} hard negatives, "
        f"{s['steps']} timed steps after {s['warmup']} warmup, LoRA r16 on q/k/v/o; "
        f"device {result['rows'][0]['device']}; "
        f"CPU {result['environment'].get('cpu_model') or '-'}; "
        f"{result['environment']['platform']}, "
        f"torch {result['environment']['torch']}, {result['environment']['torch_threads']} "
        f"threads, load average before the run {result['environment']['loadavg_1_5_15']}.",
        "",
        "| step | dtype | s/step | tokens/s | vs two-pass | vs fp32 "
        "| peak RSS MiB | peak GPU MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        gpu = "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
        lines.append(
            f"| {r['mode']} | {r['dtype']} | {r['seconds_per_step']:.2f} | "
            f"{r['tokens_per_s']:.0f} | {_x(r['speedup_vs_two_pass'])} | "
            f"{_x(r['speedup_vs_fp32'])} | {r['peak_rss_mib']:.0f} | {gpu} |"
        )
    for dtype, why in result["skipped"].items():
        lines += ["", f"{dtype} not measured: {why}"]
    if result["one_pass_faster"] is not None:
        lines += ["", f"One-pass faster than two-pass at every dtype: {result['one_pass_faster']}."]
    lines.append("")
    return "\n".join(lines)


def write_plot(path: Path, rows: list[dict[str, Any]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['mode']}\n{r['dtype']}" for r in rows]
    ax.bar(labels, [r["tokens_per_s"] for r in rows], color="tab:blue")
    ax.set_ylabel("training tokens/s")
    ax.set_title("CSIT training step: one pass vs two passes")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--data", default=DEFAULT_DATA, help="training JSONL (build-train output)")
    p.add_argument(
        "--out", default=repo_path("outputs/benchmark"), help="writes train_speed.{json,md,png}"
    )
    p.add_argument("--batch-size", type=at_least(1), default=4)
    p.add_argument("--negatives", type=at_least(0), default=2)
    p.add_argument("--steps", type=at_least(1), default=4, help="timed steps per configuration")
    p.add_argument("--warmup", type=at_least(0), default=1)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--max-session-len", type=at_least(1), default=256)
    p.add_argument("--max-passage-len", type=at_least(1), default=128)
    p.add_argument("--max-response-len", type=at_least(1), default=64)
    p.add_argument("--device", default=None, help="default: the accelerator if any, else CPU")
    p.add_argument("--force-bf16", action="store_true", help="time bf16 without native support")
    p.add_argument(
        "--threads", type=at_least(0), default=0, help="torch threads (0: torch's default)"
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def check_inputs(args: argparse.Namespace) -> None:
    """The model and enough training examples, before any model loads: a FileNotFoundError or
    ValueError (DataFormatError) naming the option otherwise."""
    require_model(args.model)
    training_examples(vars(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))), flush=True)
        return 0
    if not Path(args.data).exists():
        raise SystemExit(
            f"{args.data}: no training data; build it with `chatretriever build-train mtrag ...` "
            "(see configs/chatretriever-smol.yaml) or pass --data"
        )
    check_inputs(args)
    import torch

    from chatretriever.modeling.backbones import native_bf16

    environment = {
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": args.threads or torch.get_num_threads(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "cpu_native_bf16": native_bf16(torch.device("cpu")),
    }
    # what each (mode, dtype) child measures with (the keys `measure` reads, but mode and dtype)
    keys = ("model", "data", "batch_size", "negatives", "steps", "warmup", "device", "threads",
            "max_session_len", "max_passage_len", "max_response_len")  # fmt: skip
    common = {k: getattr(args, k) for k in keys}
    rows, skipped = [], {}
    why = None if args.force_bf16 or "bf16" not in args.dtypes else bf16_unsupported(args.device)
    if why:
        skipped["bf16"] = why
        print(f"train_speed: bf16 skipped: {why}", file=sys.stderr)
    for dtype in [d for d in args.dtypes if d not in skipped]:
        for mode in args.modes:
            print(f"train_speed: {mode} {dtype} ...", file=sys.stderr, flush=True)
            rows.append(run_child({**common, "mode": mode, "dtype": dtype}))
            r = rows[-1]
            print(
                f"  {r['seconds_per_step']:.2f} s/step, {r['tokens_per_s']:.0f} tokens/s, "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB",
                file=sys.stderr,
            )
    add_ratios(rows)
    ratios = [r["speedup_vs_two_pass"] for r in rows if r["mode"] == "one_pass"]
    ratios = [x for x in ratios if x is not None]  # None: two-pass not run (--modes)
    faster = all(x > 1 for x in ratios) if ratios else None
    argv_ = sys.argv[1:] if argv is None else list(argv)
    result = {
        "command": shlex.join(["python", "benchmarks/train_speed.py", *argv_]),
        "settings": run_settings(args, "child"),
        "environment": environment,
        "rows": rows,
        "skipped": skipped,
        "one_pass_faster": faster,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keep_previous([out / f"train_speed.{ext}" for ext in ("json", "md", "png")], result["settings"])
    write_json(out / "train_speed.json", result)
    md = markdown(result)
    with atomic_write(out / "train_speed.md") as f:
        f.write(md)
    write_plot(out / "train_speed.png", rows)
    print(md)
    return 0


if __name__ == "__main__":
    run(main)
