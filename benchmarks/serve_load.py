"""Load test of `chatretriever serve`: N search requests at concurrency C against a real server on
127.0.0.1, with the dynamic batcher (`--max-batch 32`) and without it (`--max-batch 1`: one
request per forward). Reports throughput, p50/p95/p99 latency, errors and the mean batch size the
server formed; writes JSON + a markdown table.

The requests are the demo conversations' turns (`assets/demo/conversations.jsonl`: the whole
session so far, as a client sends it), cycled. Each configuration starts its own server process
(`python -m chatretriever serve`, a random API key in the environment), warms it up, runs until
N requests are done or `--max-duration` seconds have passed, then stops it. Loopback only.
Writes OUT/serve_load.{json,md}, only when the run measured something; those of a run with other
options are kept as OUT/serve_load.prev[-N].*.

    python benchmarks/serve_load.py --index outputs/demo/index                 # 10,000 x 32
    python benchmarks/serve_load.py --index DIR --requests 200 --configs 32    # a smoke run
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key KEY  # a running server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from chatretriever.io.atomic import atomic_write
from chatretriever.retrieval.evaluate import write_json

# The helper package beside this script (on sys.path when the script runs)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _conversational.script import run  # noqa: E402
from _shared.machine import machine, machine_line  # noqa: E402
from _shared.options import above_zero, at_least  # noqa: E402
from _shared.paths import keep_previous, repo_path, run_settings  # noqa: E402
from _shared.server import counters, start_server, stop_server  # noqa: E402

TARGET_REQUESTS = 10_000
TARGET_CONCURRENCY = 32
TARGET_SPEEDUP = 2.0
MAX_ERROR_SHARE = 0.5  # a configuration with more than half its requests failed is no measurement


@dataclass
class LoadResult:
    """One configuration's numbers."""

    label: str
    max_batch: int | None
    requests: int
    concurrency: int
    seconds: float
    errors: int
    throughput: float  # successful requests per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch: float | None = None  # requests per forward, from the server's counters
    stopped_by: str = "count"  # "count" or "duration"
    loadavg_1min: list[float] = field(default_factory=list)  # after each round: others' load
    error_samples: list[str] = field(default_factory=list)


def demo_payloads(k: int) -> list[dict[str, Any]]:
    """One search body per demo turn: {"messages": the session so far, "k"}."""
    path = resources.files("chatretriever") / "assets" / "demo" / "conversations.jsonl"
    lines = Path(str(path)).read_text(encoding="utf-8").splitlines()
    return [{"messages": json.loads(line)["messages"], "k": k} for line in lines if line.strip()]


async def run_load(
    url: str,
    payloads: Sequence[dict[str, Any]],
    n: int,
    concurrency: int,
    max_duration: float,
    api_key: str | None = None,
) -> tuple[list[float], int, float, bool, list[str]]:
    """Send up to n POST /v1/search requests from `concurrency` workers.

    Returns:
        (latencies of the successful requests in seconds, error count, wall seconds, whether the
        duration limit stopped the run, up to 5 error descriptions).
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    errors: list[str] = []
    issued = 0
    start = time.perf_counter()
    deadline = start + max_duration

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < n and time.perf_counter() < deadline:
            body = payloads[issued % len(payloads)]
            issued += 1
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/search", json=body)
                ok = r.status_code == 200 and bool(r.json()["data"])
                why = f"HTTP {r.status_code}: {r.text[:200]}"
            except (httpx.HTTPError, ValueError, KeyError) as e:
                ok, why = False, f"{type(e).__name__}: {e}"
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors.append(why)

    timeout = httpx.Timeout(120.0)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=timeout
    ) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return latencies, len(errors), wall, issued < n, errors[:5]


def summarize(
    label: str,
    max_batch: int | None,
    concurrency: int,
    outcome: tuple[list[float], int, float, bool, list[str]],
    mean_batch: float | None,
) -> LoadResult:
    latencies, errors, wall, by_duration, samples = outcome
    ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    p50, p95, p99 = (float(np.percentile(ms, q)) for q in (50, 95, 99))
    return LoadResult(
        label=label,
        max_batch=max_batch,
        requests=len(latencies) + errors,
        concurrency=concurrency,
        seconds=round(wall, 2),
        errors=errors,
        throughput=round(len(latencies) / wall, 2),
        p50_ms=round(p50, 1),
        p95_ms=round(p95, 1),
        p99_ms=round(p99, 1),
        mean_batch=None if mean_batch is None else round(mean_batch, 2),
        stopped_by="duration" if by_duration else "count",
        error_samples=samples,
    )


def _label(max_batch: int) -> str:
    return "one request per forward" if max_batch == 1 else f"dynamic batcher (max {max_batch})"


def _new_total() -> dict[str, Any]:
    return {"lat": [], "errors": 0, "wall": 0.0, "by_duration": False, "samples": [],
            "batches": 0, "items": 0, "load": [], "rates": []}  # fmt: skip


def _load_round(
    args: argparse.Namespace, payloads: list[dict], url: str, key: str, n: int, t: dict[str, Any]
) -> None:
    """One round against one server: 1/rounds of its requests; adds the numbers to `t`."""
    per, seconds = -(-n // args.rounds), args.max_duration / args.rounds
    b0, i0 = counters(url)
    lat, errors, wall, by_duration, samples = asyncio.run(
        run_load(url, payloads, per, args.concurrency, seconds, key)
    )
    b1, i1 = counters(url)
    t["lat"] += lat
    t["errors"] += errors
    t["wall"] += wall
    t["by_duration"] |= by_duration
    t["samples"] = (t["samples"] + samples)[:5]
    t["batches"] += b1 - b0
    t["items"] += i1 - i0
    t["load"].append(os.getloadavg()[0])
    t["rates"].append(len(lat) / wall)


def bench_configs(
    args: argparse.Namespace, payloads: list[dict], batches: Sequence[int]
) -> list[LoadResult]:
    """One server per --max-batch value, all started first; then each is loaded in turn,
    `--rounds` times, so that a change in what else runs on the machine (2 shared cores) touches
    every configuration alike. Each round sends 1/rounds of the requests, within 1/rounds of
    --max-duration."""
    servers: dict[int, tuple[subprocess.Popen, str, str]] = {}
    totals: dict[int, dict[str, Any]] = {}
    try:
        for b in batches:
            key = secrets.token_urlsafe(24)
            servers[b] = (*start_server(args, b, key), key)
        for _, url, key in servers.values():  # warm-up: first forwards, connections
            warm = min(len(payloads), 2 * args.concurrency)
            asyncio.run(run_load(url, payloads, warm, args.concurrency, 120, key))
        for round_no in range(args.rounds):
            for b, (_, url, key) in servers.items():
                n = args.baseline_requests if (b == 1 and args.baseline_requests) else args.requests
                _load_round(args, payloads, url, key, n, totals.setdefault(b, _new_total()))
                print(f"round {round_no + 1}: {_label(b)}: {totals[b]['rates'][-1]:.1f} req/s")
    finally:
        for proc, _, _ in servers.values():
            stop_server(proc)
    results = []
    for b, t in totals.items():
        outcome = (t["lat"], t["errors"], t["wall"], t["by_duration"], t["samples"])
        mean_batch = t["items"] / t["batches"] if t["batches"] else None
        result = summarize(_label(b), b, args.concurrency, outcome, mean_batch)
        result.loadavg_1min = [round(x, 2) for x in t["load"]]
        results.append(result)
    return results


def failure(results: Sequence[LoadResult]) -> str | None:
    """Why these results are no measurement (None when they are one): a configuration without a
    single successful request, or with more than MAX_ERROR_SHARE of its requests failed."""
    for r in results:
        ok = r.requests - r.errors
        if ok == 0 or r.errors > MAX_ERROR_SHARE * r.requests:
            first = f" (first: {r.error_samples[0]})" if r.error_samples else ""
            return (
                f"{r.label}: {r.errors} of {r.requests} requests failed{first}; no results written"
            )
    return None


def markdown(results: Sequence[LoadResult], speedup: float | None) -> str:
    rows = [
        "| server | requests | concurrency | errors | req/s | p50 ms | p95 ms | p99 ms | "
        "mean batch | stopped by |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        mean = "" if r.mean_batch is None else f"{r.mean_batch:.1f}"
        rows.append(
            f"| {r.label} | {r.requests:,} | {r.concurrency} | {r.errors} | {r.throughput:.1f} | "
            f"{r.p50_ms:.0f} | {r.p95_ms:.0f} | {r.p99_ms:.0f} | {mean} | {r.stopped_by} |"
        )
    if speedup is not None:
        rows.append(f"\nbatcher / one request per forward: **{speedup:.2f}x** requests/s")
    return "\n".join(rows) + "\n"


def environment() -> dict[str, Any]:
    """The machine (`_shared/machine.py`; the server's torch runs in its own process, so the
    client records none) and its load when the run starts."""
    return {**machine(torch_used=False), "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def redacted(argv: Sequence[str]) -> list[str]:
    """`argv` with the value of `--api-key` (or an abbreviation argparse takes for it) replaced
    by "***": the command is written into the results, the key must not be."""
    out, hide = [], False
    for arg in argv:
        name, eq, _ = arg.partition("=")
        if hide:
            arg, hide = "***", False
        elif len(name) > 2 and "--api-key".startswith(name):
            arg, hide = (f"{name}=***", False) if eq else (arg, True)
        out.append(arg)
    return out


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a comma list of --max-batch values, got {text!r}"
        ) from None
    if any(b < 1 for b in sizes) or len(set(sizes)) < len(sizes):
        raise argparse.ArgumentTypeError(f"--max-batch values are distinct and >= 1, got {text!r}")
    return sizes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", help="corpus index dir: a server is started per configuration")
    p.add_argument("--model", help="query encoder (default: the index's model)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "auto"], help="model precision")
    p.add_argument("--url", help="load an already running server instead (one configuration)")
    p.add_argument("--api-key", help="its API key (with --url)")
    p.add_argument(
        "--configs",
        type=_batch_sizes,
        default=[32, 1],
        help="--max-batch values to compare (comma list, default 32,1)",
    )
    p.add_argument("--wait", type=float, default=5.0, help="--max-wait-ms of the servers")
    p.add_argument(
        "--requests", type=at_least(1), default=TARGET_REQUESTS, help="requests per config"
    )
    p.add_argument(
        "--baseline-requests", type=at_least(1), help="requests for --max-batch 1 (fewer)"
    )
    p.add_argument("--concurrency", type=at_least(1), default=TARGET_CONCURRENCY)
    p.add_argument(
        "--max-duration", type=above_zero, default=900.0, help="seconds per config at most"
    )
    p.add_argument(
        "--rounds", type=at_least(1), default=3, help="alternate the configs this many times"
    )
    p.add_argument("--k", type=at_least(1), default=10, help="passages per request")
    p.add_argument("--out", default=repo_path("outputs/serve_load"), help="output directory")
    args = p.parse_args(argv)
    if bool(args.index) == bool(args.url):
        p.error("give --index (servers are started) or --url (a running server)")
    if args.url and httpx.URL(args.url).host not in ("127.0.0.1", "localhost", "::1"):
        p.error("--url must be a loopback address: this benchmark only loads local servers")
    if args.wait < 0:
        p.error(f"--wait: must be at least 0, got {args.wait}")
    if args.index and not Path(args.index).is_dir():
        p.error(f"--index {args.index}: no such directory")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    payloads = demo_payloads(args.k)
    results: list[LoadResult] = []
    if args.url:
        outcome = asyncio.run(
            run_load(
                args.url, payloads, args.requests, args.concurrency, args.max_duration, args.api_key
            )
        )
        results.append(summarize(args.url, None, args.concurrency, outcome, None))
    if not args.url:
        batches = args.configs
        print(f"--max-batch {batches}: {args.requests} requests at concurrency {args.concurrency}")
        results += bench_configs(args, payloads, batches)
    why = failure(results)
    if why is not None:  # a failed run does not replace the previous measurement
        print(f"error: {why}", file=sys.stderr)
        return 1
    by_batch = {r.max_batch: r for r in results}
    speedup = None
    if 1 in by_batch and len(by_batch) > 1 and by_batch[1].throughput > 0:
        best = max(r.throughput for b, r in by_batch.items() if b != 1)
        speedup = best / by_batch[1].throughput
    out = Path(args.out)
    report = {
        "command": "python benchmarks/serve_load.py "
        + shlex.join(redacted(sys.argv[1:] if argv is None else argv)),
        "environment": environment(),
        "settings": run_settings(args, "api_key"),  # the key is a secret, not a setting
        "targets": {
            "requests": TARGET_REQUESTS,
            "concurrency": TARGET_CONCURRENCY,
            "speedup": TARGET_SPEEDUP,
        },
        "results": [asdict(r) for r in results],
        "speedup": None if speedup is None else round(speedup, 2),
    }
    keep_previous([out / "serve_load.json", out / "serve_load.md"], report["settings"])
    write_json(out / "serve_load.json", report)
    text = markdown(results, speedup)
    text += f"\n{machine_line(report['environment'])}\n\n`{report['command']}`\n"
    with atomic_write(out / "serve_load.md") as f:
        f.write(text)
    print(text)
    print(f"wrote {out / 'serve_load.json'} and {out / 'serve_load.md'}")
    return 0


if __name__ == "__main__":
    run(main)
