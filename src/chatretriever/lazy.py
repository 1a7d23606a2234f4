"""Lazy package exports (PEP 562): a package names its entry points and the module of each, and
they are imported on first use, so importing the package loads nothing heavy (torch, Faiss).
Stdlib only."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of a package whose names live in its submodules.

    Args:
        package: The package's `__name__`.
        exports: Exported name -> the submodule (relative to the package) that defines it.

    Returns:
        (`__getattr__`, `__dir__`) to assign at the package's top level.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    def __dir__() -> list[str]:
        return sorted([*vars(sys.modules[package]), *exports])

    return __getattr__, __dir__
