"""Argparse types for the benchmark scripts' numeric options: a bad value is a usage error
(exit 2) before anything loads, not a traceback minutes into a run."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an int >= low (`--steps`, `--batch-size`: 1; `--threads`: 0)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its "invalid int value" message
    return parse


def above_zero(text: str) -> float:
    """An argparse type: a float > 0 (a duration)."""
    value = float(text)
    if not value > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


above_zero.__name__ = "float"
