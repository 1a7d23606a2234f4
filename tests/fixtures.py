"""Small helpers the tests share for writing inline fixture files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path


def write(path: Path, text: str) -> Path:
    """Write `text` to `path` (parents created), gzip-compressed when the name ends in .gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows) -> str:
    """Rows as JSON lines text."""
    return "".join(json.dumps(r) + "\n" for r in rows)
