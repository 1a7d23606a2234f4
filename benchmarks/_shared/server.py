"""A `chatretriever serve` process on a free loopback port, for the benchmarks that load a real
server (serve_load.py): started with a random API key in its environment, waited for until
/healthz answers, its refusal reported by its own last log line, stopped with SIGINT."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

START_TIMEOUT = 300.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    args: argparse.Namespace, max_batch: int, key: str
) -> tuple[subprocess.Popen, str]:
    """`python -m chatretriever serve` on a free loopback port; returns it once /healthz answers."""
    port = _free_port()
    argv = [sys.executable, "-m", "chatretriever", "serve", "--index", args.index]
    argv += ["--port", str(port), "--max-batch", str(max_batch), "--max-wait-ms", str(args.wait)]
    if args.model:
        argv += ["--model", args.model]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    env = {**os.environ, "CHATRETRIEVER_API_KEYS": key, "HF_HUB_OFFLINE": "1"}
    log = Path(args.out) / f"serve-max-batch-{max_batch}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as stderr:  # the child keeps its own handle
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            why = last_line(log).removeprefix("error: ") or "no message"
            raise SystemExit(f"error: serve exited with {proc.returncode}: {why} (log: {log})")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.5)
    proc.kill()
    proc.wait()
    raise SystemExit(f"error: serve did not answer /healthz in {START_TIMEOUT:.0f} s (log: {log})")


def last_line(log: Path) -> str:
    """The last non-blank line of a server's log: its own `error: ...` line when it refused."""
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    return next((ln.strip() for ln in reversed(lines) if ln.strip()), "")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def counters(url: str) -> tuple[int, int]:
    health = httpx.get(f"{url}/healthz", timeout=10).json()
    return int(health["batches"]), int(health["items"])
