"""The machine a benchmark ran on: recorded beside every timing (JSON and markdown)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Any

# the lscpu flags that decide how fast bf16 (and so most CPU timings here) runs
BF16_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "avx512_bf16")


def _lscpu() -> str | None:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def cpu_model() -> str:
    """The CPU's model name as `lscpu` reports it (`platform.processor()` without lscpu)."""
    out = _lscpu()
    if out is None:
        return platform.processor()
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return ""


def cpu_flags(wanted: tuple[str, ...] = BF16_FLAGS) -> list[str]:
    """Which of `wanted` the CPU has, as `lscpu` lists its flags (empty without lscpu)."""
    out = _lscpu() or ""
    line = next((ln for ln in out.splitlines() if ln.startswith("Flags:")), "")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in wanted if f in have]


def machine(dtype: str | None = None, torch_used: bool = True) -> dict[str, Any]:
    """CPU model and bf16 flags, CPU count, torch threads and version (when torch is used),
    dtype, platform."""
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if torch_used:
        try:
            import torch
        except ImportError:  # a torch-free run (BM25 only, scoring): nothing to record
            torch = None
        if torch is not None:
            info.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    if dtype is not None:
        info["dtype"] = dtype
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One markdown line: "Machine: <CPU model>, N CPUs, T torch threads, torch V, dtype D"."""
    parts = [info.get("cpu_model") or "unknown CPU", f"{info.get('cpu_count')} CPUs"]
    if "torch" in info:
        parts += [f"{info['torch_threads']} torch threads", f"torch {info['torch']}"]
    if "dtype" in info:
        parts.append(f"dtype {info['dtype']}")
    python = info.get("python", sys.version.split()[0])
    return "Machine: " + ", ".join(parts) + f"; python {python}."
