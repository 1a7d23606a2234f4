"""The command-line ending the MTRAG benchmark scripts share."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

from chatretriever.errors import DataFormatError


def run(main: Callable[[], int]) -> NoReturn:
    """`sys.exit(main())`, an expected input error (a malformed or missing file, a package not
    installed, a bad value) ending as one line `error: ...` with exit status 1, not a traceback."""
    try:
        sys.exit(main())
    except (DataFormatError, ValueError, FileNotFoundError, ImportError) as e:
        sys.exit(f"error: {e}")
