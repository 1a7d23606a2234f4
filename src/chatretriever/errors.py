"""The errors users see as one line: bad input (file, line, field) and a missing optional extra."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


class DataFormatError(ValueError):
    """Bad input data.

    Args:
        path: The file that holds the bad input.
        message: What is wrong.
        line: 1-based line number, when the format is line based.
        field: The field or column that is wrong, when one is.
    """

    def __init__(
        self,
        path: str | Path,
        message: str,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.message = message
        where = self.path if line is None else f"{self.path}:{line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{message}")


# Top-level module -> the extra of pyproject.toml that installs it.
EXTRAS: dict[str, str] = {
    "torch": "train",
    "transformers": "train",
    "peft": "train",
    "accelerate": "train",
    "safetensors": "train",
    "gguf": "train",
    "sentencepiece": "train",
    "trl": "train",
    "datasets": "train",
    "faiss": "faiss",
    "pymilvus": "milvus",
    "milvus_lite": "milvus",
    "ir_measures": "eval",
    "pytrec_eval": "eval",
    "scipy": "eval",
    "bm25s": "baselines",
    "Stemmer": "baselines",
    "fastapi": "serve",
    "uvicorn": "serve",
    "matplotlib": "plot",
    "rouge_score": "rag",
    "openvino": "openvino",
    "ray": "ray",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message is the one line to act on.

    Args:
        module: The module that could not be imported ("faiss", "ir_measures", ...).
        extra: The extra of chatretriever that installs it ("faiss", "eval", ...).
        purpose: What needs it ("the index", "evaluation"), shown first when given.
        cause: Why the import failed, when the module is installed but broken.
    """

    def __init__(
        self, module: str, extra: str, purpose: str | None = None, cause: str | None = None
    ) -> None:
        self.module = module
        self.extra = extra
        who = f"{purpose} needs {module}" if purpose else module
        sep = ", which" if purpose else ""
        why = "is not installed"
        if cause is not None:  # the cause may span lines: the message stays one line
            why = f"fails to import ({' '.join(cause.split())})"
        super().__init__(f"{who}{sep} {why}: pip install 'chatretriever[{extra}]'", name=module)


def extra_of(module: str) -> str | None:
    """The extra that installs `module` (or its top-level package), None when it is not ours."""
    return EXTRAS.get(module.split(".")[0])


def require_extra(module: str, extra: str | None = None, purpose: str | None = None) -> Any:
    """Import an optional dependency, or raise `MissingExtraError` naming the extra to install.

    Args:
        module: Module to import ("faiss", "matplotlib.pyplot", ...).
        extra: The extra that installs it; default `EXTRAS[top-level package]`.
        purpose: What needs it, for the message.

    Returns:
        The imported module.
    """
    extra = extra or extra_of(module) or "all"
    try:
        # builtins.__import__ (not importlib) so that tests can make an import fail by patching it
        __import__(module)
    except ImportError as e:
        top = module.split(".")[0]
        not_installed = isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == top
        raise MissingExtraError(module, extra, purpose, None if not_installed else str(e)) from e
    return sys.modules[module]


def as_missing_extra(error: ImportError) -> MissingExtraError | None:
    """A `MissingExtraError` for an import error of one of our optional dependencies, else None.

    Catches the imports that happen at module level (torch in the training modules), which no
    `require_extra` call guards.
    """
    if isinstance(error, MissingExtraError):
        return error
    name = getattr(error, "name", None) or ""
    extra = extra_of(name) if isinstance(error, ModuleNotFoundError) else None
    return None if extra is None else MissingExtraError(name.split(".")[0], extra)
