"""Per-turn latency of incremental session encoding against full re-encoding, on real MTRAG
conversations.

Each MTRAG task holds a conversation so far; its session at user turn k (k = 1..10) is the
messages up to that turn's question. A conversation is replayed turn by turn: at every turn the
session is encoded by `ChatRetriever.encode_sessions` (the full re-encode: render, tokenize,
forward over every token) and by `IncrementalSessionEncoder.encode` (render, tokenize, forward
over the new turn and the EMB tokens only, on the conversation's cached keys and values), in
alternating order, one session per call (batch 1, as a server sees a turn), and the two
embeddings are compared (cosine). The N conversations with the most user turns are used.

Run once per session budget: the model's own `max_session_len` (the shipped model: 384 tokens,
so from about turn 4 on old turns are dropped and each turn falls back to a full encode: the
cached prefix shifts) and a budget no conversation reaches (no truncation: what the
incremental path is for).

    python benchmarks/incremental.py                          # 30 conversations, 2 budgets
    python benchmarks/incremental.py --n-conversations 4 --max-turns 3   # a smoke run
    python benchmarks/incremental.py --long-only --serving-weights      # weights merged + cast once

On a CPU that other jobs share, add `--threads 1` (steady timings). Writes
OUT/incremental.{json,md,png}; those of a run with other options are kept as
OUT/incremental.prev[-N].*.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from chatretriever.errors import require_extra
from chatretriever.io.atomic import atomic_write
from chatretriever.io.mtrag import load_mtrag
from chatretriever.retrieval.evaluate import write_json
from chatretriever.types import Session

# The helper package beside this script (on sys.path when the script runs)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _conversational.script import run  # noqa: E402
from _shared.machine import cpu_model  # noqa: E402, F401  (also this script's surface)
from _shared.paths import keep_previous, repo_path, require_model, run_settings  # noqa: E402

TARGET_SPEEDUP = 5.0  # at turn 6 and beyond, without truncation
TARGET_FROM_TURN = 6
TARGET_COSINE = 0.9999


def environment() -> dict[str, Any]:
    """Where it ran: CPU, threads and the load average (other processes busy?)."""
    import torch

    from chatretriever.modeling.backbones import native_bf16

    load = os.getloadavg()
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_native_bf16": native_bf16(torch.device("cpu")),
        "loadavg_1_5_15": [round(x, 2) for x in load],
        "other_processes_busy": load[0] >= 0.5,
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


def turn_sessions(session: Session, max_turns: int) -> list[list[dict[str, str]]]:
    """The session at each of the first `max_turns` user turns (messages up to that question)."""
    msgs = [t.to_dict() for t in session.turns]
    ends = [i + 1 for i, m in enumerate(msgs) if m["role"] == "user"]
    return [msgs[:end] for end in ends[:max_turns]]


def pick_conversations(data: str, n: int, seed: int) -> list[Session]:
    """The n MTRAG tasks with the most user turns (ties in a seeded random order)."""
    sessions = load_mtrag(data).sessions
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sessions))
    users = [sum(t.role == "user" for t in s.turns) for s in sessions]
    order = sorted(order, key=lambda i: -users[i])  # stable: the shuffle breaks ties
    return [sessions[i] for i in order[:n]]


def _timed(fn, *args) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def replay(retriever: Any, conversations: list[Session], max_turns: int) -> list[dict]:
    """One record per (conversation, turn): both latencies, tokens, cosine, what the cache did."""
    from chatretriever.methods.chatretriever.incremental import IncrementalSessionEncoder

    inc = IncrementalSessionEncoder(retriever)
    warm = turn_sessions(conversations[0], 2)
    retriever.encode_sessions(warm[-1:], batch_size=1)  # warm-up, not timed
    for session in warm:
        inc.encode("warm-up", session)
    inc.reset("warm-up")
    records = []
    total = sum(len(turn_sessions(c, max_turns)) for c in conversations)
    desc = f"replay (max_session_len {retriever.template.max_session_len})"
    with tqdm(total=total, desc=desc, unit="turn") as bar:
        for ci, conv in enumerate(conversations):
            for k, session in enumerate(turn_sessions(conv, max_turns), start=1):
                # Alternate which runs first (warm caches, clock drift).
                rec = _step(retriever, inc, conv.id, session, full_first=bool((ci + k) % 2))
                records.append({"conversation": conv.id, "turn": k, **rec})
                bar.update(1)
    return records


def _step(
    retriever: Any, inc: Any, conv_id: str, session: list[dict], full_first: bool
) -> dict[str, Any]:
    """Encode one turn both ways; time each and read what the cache did from its counters."""
    before = inc.stats
    if full_first:
        full, full_s = _timed(retriever.encode_sessions, [session], 1)
        emb, inc_s = _timed(inc.encode, conv_id, session)
    else:
        emb, inc_s = _timed(inc.encode, conv_id, session)
        full, full_s = _timed(retriever.encode_sessions, [session], 1)
    after = inc.stats
    grew = [key for key in after if after[key] > before[key]]
    outcome = next(k for k in ("hits", "misses", "fallbacks") if k in grew)
    reason = next((k[len("fallback_") :] for k in grew if k.startswith("fallback_")), None)
    f = full[0]  # (D,)
    return {
        "tokens": len(retriever.template.session_ids(session)),
        "tokens_computed": after["tokens_computed"] - before["tokens_computed"],
        "full_ms": full_s * 1e3,
        "incremental_ms": inc_s * 1e3,
        "cosine": float(emb @ f / (np.linalg.norm(emb) * np.linalg.norm(f))),
        "cache": outcome,
        "fallback_reason": reason,
    }


def per_turn(records: list[dict]) -> list[dict]:
    """Medians and means per turn; speedup = median full / median incremental."""
    by_turn: dict[int, list[dict]] = defaultdict(list)
    for rec in records:
        by_turn[rec["turn"]].append(rec)
    rows = []
    for turn in sorted(by_turn):
        recs = by_turn[turn]
        full = np.array([r["full_ms"] for r in recs])
        inc = np.array([r["incremental_ms"] for r in recs])
        rows.append(
            {
                "turn": turn,
                "n": len(recs),
                "tokens_mean": float(np.mean([r["tokens"] for r in recs])),
                "tokens_computed_mean": float(np.mean([r["tokens_computed"] for r in recs])),
                "full_ms_median": float(np.median(full)),
                "incremental_ms_median": float(np.median(inc)),
                "full_ms_mean": float(full.mean()),
                "incremental_ms_mean": float(inc.mean()),
                "speedup": float(np.median(full) / np.median(inc)),
                "cosine_min": float(min(r["cosine"] for r in recs)),
                "hits": sum(r["cache"] == "hits" for r in recs),
                "fallbacks": sum(r["cache"] == "fallbacks" for r in recs),
            }
        )
    return rows


def summary(rows: list[dict], records: list[dict]) -> dict:
    """Speedup at turns >= TARGET_FROM_TURN (pooled medians) and whether the targets are met."""
    late = [r for r in records if r["turn"] >= TARGET_FROM_TURN]
    out: dict[str, Any] = {"cosine_min": float(min(r["cosine"] for r in records))}
    if late:
        full = np.median([r["full_ms"] for r in late])
        inc = np.median([r["incremental_ms"] for r in late])
        out["speedup_from_turn_6"] = float(full / inc)
        out["min_turn_speedup_from_turn_6"] = min(
            r["speedup"] for r in rows if r["turn"] >= TARGET_FROM_TURN
        )
    # None when no turn reached TARGET_FROM_TURN: not measured, not failed
    out["meets_targets"] = (
        bool(
            out["min_turn_speedup_from_turn_6"] >= TARGET_SPEEDUP
            and out["cosine_min"] >= TARGET_COSINE
        )
        if late
        else None
    )
    return out


# ------------------------------------------------------------------------------ output
def _label(budget: dict) -> str:
    own = " (the model's)" if budget["models_own"] else " (no truncation)"
    merged = ", serving weights" if budget.get("serving_weights") else ""
    return f"max_session_len {budget['max_session_len']}{own}{merged}"


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = [
        "# Incremental session encoding: per-turn latency",
        "",
        f"{result['model']} ({result['dtype']}) on {result['device']}, CPU {env['cpu_model']}, "
        f"torch threads {env['torch_threads']} of {env['cpu_count']} CPUs, load average at start "
        f"{env['loadavg_1_5_15']} (other processes busy: {env['other_processes_busy']}). "
        f"{result['n_conversations']} MTRAG conversations (those with the most user turns), "
        "batch 1; latencies are medians over the conversations that reach the turn; speedup = "
        "median full / median incremental.",
    ]
    for budget in result["budgets"]:
        s = budget["summary"]
        lines += [
            "",
            f"## {_label(budget)}",
            "",
            "| turn | n | tokens | tokens computed (incr.) | full ms | incremental ms | speedup "
            "| cache hits | fallbacks | cosine min |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['turn']} | {r['n']} | {r['tokens_mean']:.0f} | {r['tokens_computed_mean']:.0f} "
            f"| {r['full_ms_median']:.1f} | {r['incremental_ms_median']:.1f} | "
            f"{r['speedup']:.2f}x | {r['hits']} | {r['fallbacks']} | {r['cosine_min']:.6f} |"
            for r in budget["per_turn"]
        ]
        pooled = s.get("speedup_from_turn_6")
        met = s["meets_targets"]
        met = "not measured (no turn that late)" if met is None else met
        lines += [
            "",
            f"Turns >= {TARGET_FROM_TURN}: pooled speedup "
            + (
                f"{pooled:.2f}x, lowest per-turn {s['min_turn_speedup_from_turn_6']:.2f}x"
                if pooled
                else "n/a"
            )
            + f" (target >= {TARGET_SPEEDUP:g}x); cosine min {s['cosine_min']:.6f} (target >= "
            f"{TARGET_COSINE}); fallbacks by reason {budget['fallback_reasons']}; targets met: "
            f"{met}.",
        ]
    lines += ["", f"`{result['command']}`", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Median latency vs turn, full and incremental, one pair of lines per session budget."""
    require_extra("matplotlib", "plot", "the latency plot").use("Agg")  # no display needed
    plt = require_extra("matplotlib.pyplot", "plot", "the latency plot")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for budget, color in zip(result["budgets"], ("tab:blue", "tab:orange"), strict=False):
        turns = [r["turn"] for r in budget["per_turn"]]
        for key, style, mode in (
            ("full_ms_median", "--", "full"),
            ("incremental_ms_median", "-", "incremental"),
        ):
            values = [r[key] for r in budget["per_turn"]]
            ax.plot(
                turns, values, style, marker="o", color=color, label=f"{mode}, {_label(budget)}"
            )
    ax.set_xlabel("user turn")
    ax.set_ylabel("median latency per turn (ms)")
    ax.set_yscale("log")
    ax.set_title(f"Session encoding per turn, {result['model']} ({result['dtype']}, batch 1)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--data", default=repo_path("../shared/data/mtrag"), help="the MTRAG directory")
    p.add_argument("--out", default=repo_path("outputs/incremental"), help="output directory")
    p.add_argument("--model", default="chatretriever-smol", help="a ChatRetriever name or dir")
    p.add_argument("--n-conversations", type=int, default=30, help="conversations replayed")
    p.add_argument("--max-turns", type=int, default=10, help="user turns replayed per conversation")
    p.add_argument(
        "--long-max-session-len",
        type=int,
        default=8192,
        help="the second session budget (0: only the model's own)",
    )
    p.add_argument("--long-only", action="store_true", help="skip the model's own max_session_len")
    p.add_argument(
        "--serving-weights",
        action="store_true",
        help="merge LoRA and the EMB rows into the weights and cast them to the compute dtype "
        "once before timing (both paths): no forward re-casts weights or copies the embedding "
        "matrix (what a serving setup does; not the library's default encode path)",
    )
    p.add_argument("--device", help="cpu, cuda, ... (default: the accelerator, else cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); 1 gives steady timings on a CPU that "
        "other processes share (spinning OpenMP threads slow down many-fold there)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("n_conversations", "max_turns"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("long_max_session_len", "threads"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    return args


def serving_weights(retriever: Any) -> None:
    """Merge LoRA and the EMB rows into the weights, then cast them to the compute dtype once
    (the first `fp32_layers` decoder layers stay fp32, as autocast runs them). In place.

    Under LoRA and bf16 autocast every forward re-casts each fp32 weight to bf16 and peft's
    trainable-token wrapper copies the whole embedding matrix: a fixed cost per forward that
    does not depend on how many tokens it computes.
    """
    import torch

    from chatretriever.modeling.adapters import is_peft

    if is_peft(retriever.model):
        retriever.model = retriever.model.merge_and_unload()
    if retriever.compute_dtype != torch.float32:
        retriever.model.to(retriever.compute_dtype)
        layers = getattr(retriever._base().get_decoder(), "layers", None) or []
        for layer in list(layers)[: retriever.config.fp32_layers]:
            layer.float()


def run_budget(args: argparse.Namespace, conversations: list[Session], long: bool) -> dict:
    """Load the retriever (its own max_session_len, or the long one) and replay."""
    from chatretriever.methods.chatretriever.model import ChatRetriever

    overrides = {"max_session_len": args.long_max_session_len} if long else {}
    retriever = ChatRetriever.from_pretrained(args.model, device=args.device, **overrides)
    if args.serving_weights:
        serving_weights(retriever)
    records = replay(retriever, conversations, args.max_turns)
    rows = per_turn(records)
    reasons: dict[str, int] = defaultdict(int)
    for r in records:
        if r["fallback_reason"]:
            reasons[r["fallback_reason"]] += 1
    return {
        "max_session_len": retriever.template.max_session_len,
        "serving_weights": args.serving_weights,
        "models_own": not long,
        "dtype": str(retriever.compute_dtype).replace("torch.", ""),
        "device": str(retriever.device),
        "per_turn": rows,
        "summary": summary(rows, records),
        "fallback_reasons": dict(reasons),
        "records": records,
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.long_only and not args.long_max_session_len:
        raise SystemExit("--long-only needs --long-max-session-len > 0")
    require_model(args.model)  # before the data and the model load
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    env = environment()  # first: the load average before this process works
    conversations = pick_conversations(args.data, args.n_conversations, args.seed)
    budgets = [] if args.long_only else [run_budget(args, conversations, long=False)]
    if args.long_max_session_len:
        budgets.append(run_budget(args, conversations, long=True))
    env["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "command": shlex.join(["python", "benchmarks/incremental.py", *argv]),
        "environment": env,
        "settings": run_settings(args),
        "model": args.model,
        "dtype": budgets[0]["dtype"],
        "device": budgets[0]["device"],
        "serving_weights": args.serving_weights,
        "n_conversations": len(conversations),
        "targets": {"speedup_from_turn_6": TARGET_SPEEDUP, "cosine_min": TARGET_COSINE},
        "budgets": budgets,
    }
    out = Path(args.out)
    keep_previous([out / f"incremental.{ext}" for ext in ("json", "md", "png")], result["settings"])
    write_json(out / "incremental.json", result)
    text = markdown(result)
    with atomic_write(out / "incremental.md") as f:
        f.write(text)
    plot(result, out / "incremental.png")
    print(text)
    print(f"-> {out / 'incremental'}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    run(main)
