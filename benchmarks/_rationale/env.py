"""The machine a benchmark ran on (recorded with every number): `_shared/machine.py`'s record,
the load when the run starts, and the command."""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

from _shared.machine import machine


def environment() -> dict[str, Any]:
    """`machine()` (CPU model and count, torch and its threads, platform, python), the load
    average before this process works, and the command line."""
    return {
        **machine(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "command": "python " + shlex.join(sys.argv),
    }


def environment_words(env: dict[str, Any]) -> str:
    """The first words of every report: "`<command>` on <CPU model> (N cores, load [..])"."""
    # results recorded before the shared machine record named the CPU "cpu"
    cpu = env.get("cpu_model", env.get("cpu"))
    return f"`{env['command']}` on {cpu} ({env['cpu_count']} cores, load {env['loadavg_1_5_15']})"
