"""Default paths of the benchmark scripts, resolved against the repository root.

A default such as `--data ../shared/data/mtrag` or `--out outputs/benchmark` names a place beside
the repository, so a script started from another directory still finds its data and writes its
outputs into the repository; a path the user gives stays relative to the current directory.
Results whose file name does not hold every setting are kept aside, not replaced, when a run with
other settings writes that name: every script records `run_settings` as its JSON's "settings" and
calls `keep_previous` before it writes.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]  # benchmarks/_shared/paths.py -> the repository


def repo_path(relative: str) -> str:
    """`relative` (a default of a script) as a path under the repository root."""
    return os.path.normpath(REPO / relative)


def run_settings(args: argparse.Namespace, *ignored: str) -> dict[str, Any]:
    """The options a script's results depend on, as its JSON records them ("settings").

    Args:
        args: The script's parsed options.
        ignored: Options that change no result (verbosity, a secret, an internal switch);
            `out` (where the results go) is always left out.

    Returns:
        {option: value}, JSON's types (a Path as its text, a tuple as a list): what
        `keep_previous` later reads back from the file is equal to it.
    """
    kept = {k: v for k, v in vars(args).items() if k not in {"out", *ignored}}
    return json.loads(json.dumps(kept, default=str))


def keep_previous(files: Sequence[Path], settings: Mapping[str, Any]) -> Path | None:
    """Keep a result set made with other settings aside before new results replace it.

    When the JSON at `files[0]` was made with other `settings` (its "settings" key; none counts
    as other), every one of `files` there is renamed to <stem>.prev[-N]<suffix> (N: the first
    number free for all of them) and the move is printed; with the same settings the files are
    left to be replaced (a rerun).

    Args:
        files: The result set, its JSON first (then e.g. its .md and .png).
        settings: The settings of the run about to write them (`run_settings`).

    Returns:
        The JSON's new name, None when nothing was moved (no results there, or a rerun).
    """
    first = Path(files[0])
    if not first.is_file():
        return None
    try:
        previous = json.loads(first.read_text()).get("settings")
    except (ValueError, AttributeError):
        previous = None
    if previous == json.loads(json.dumps(settings, default=str)):
        return None
    n = 1
    while any(_aside(Path(f), n).exists() for f in files):
        n += 1
    for f in map(Path, files):
        if f.exists():
            f.rename(_aside(f, n))
    kept = _aside(first, n)
    print(f"  the results there had other settings: kept as {kept.with_suffix('')}.*")
    return kept


def _aside(path: Path, n: int) -> Path:
    return path.with_name(f"{path.stem}.prev{'' if n == 1 else f'-{n}'}{path.suffix}")


def require_model(name_or_path: str, option: str = "--model") -> None:
    """A FileNotFoundError naming `option` unless `name_or_path` is a built-in model name or an
    existing path: checked before a script loads data or a model, not minutes into the run."""
    from chatretriever.modeling.sources import builtin

    if builtin(name_or_path) is None and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(
            f"{option} {name_or_path}: not a local model directory, a .gguf file or a built-in "
            "model (`chatretriever models` lists them); nothing is downloaded"
        )
