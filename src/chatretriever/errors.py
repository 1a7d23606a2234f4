"""The one error type for bad input: it names the file, the line and the field."""

from __future__ import annotations

from pathlib import Path


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
