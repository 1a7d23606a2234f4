"""The fp32 reference embeddings of `encode_speed.py` cached on disk (`--reference`): written with
a key (the passage ids and the model's weights) beside them, and refused when read for other
passages or another model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from chatretriever.io.atomic import atomic_write


def reference_key_file(path: str | Path) -> Path:
    """The key beside a reference cache: <path>.json (never a neighbour's <stem>.json); a cache
    written before that name has its key at <stem>.json, read (never written) for it."""
    new = Path(f"{path}.json")
    legacy = Path(path).with_suffix(".json")
    return new if new.is_file() or not legacy.is_file() else legacy


def check_reference(path: str | Path, key: dict | None) -> None:
    """A --reference file that exists must be a reference this script wrote (its key beside it)
    of the same passages (and, given the weights in `key`, the same model): else ValueError
    (the file is kept; choose another path)."""
    key_file = reference_key_file(path)
    if not key_file.is_file():
        raise ValueError(
            f"--reference {path}: not a reference cache of this script (no {Path(f'{path}.json')}"
            "); it is kept: choose another path"
        )
    saved = json.loads(key_file.read_text())
    key = json.loads(json.dumps(key)) if key is not None else None  # tuples as the file has them
    if saved.get("ids") != (key or {}).get("ids", saved.get("ids")):
        raise ValueError(
            f"--reference {path}: the reference of {len(saved.get('ids', []))} other passages "
            "(another --n, --seed or --data); it is kept: choose another path"
        )
    if key is not None and "weights" in key and saved.get("weights") != key["weights"]:
        raise ValueError(
            f"--reference {path}: the reference of another model's weights; it is kept: "
            "choose another path"
        )


def save_reference(path: Path, emb: np.ndarray, key: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        np.save(f, emb)
    with atomic_write(Path(f"{path}.json")) as f:
        json.dump(key, f)
