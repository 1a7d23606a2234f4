"""The command-line ending the MTRAG benchmark scripts share."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

from chatretriever.errors import DataFormatError

INPUT_ERROR = 2  # exit status of bad input (as argparse's usage errors)
INTERRUPTED = 130  # Ctrl-C / SIGINT, as a shell reports it


def run(main: Callable[[], int]) -> NoReturn:
    """`sys.exit(main())`, an expected input error (a malformed or missing file, a package not
    installed, a bad value, a `SystemExit("why")` a script raises) ending as one line
    `error: ...` with exit status 2, and Ctrl-C as one line `interrupted` with status 130, not
    a traceback."""
    try:
        code = main()
    except (DataFormatError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(INPUT_ERROR)
    except SystemExit as e:  # `raise SystemExit("why")` in a script: bad input, said as above
        if not isinstance(e.code, str):
            raise
        print(f"error: {e.code.removeprefix('error: ')}", file=sys.stderr)
        sys.exit(INPUT_ERROR)
    except KeyboardInterrupt:
        print("interrupted (what was written so far is kept: rerun to resume)", file=sys.stderr)
        sys.exit(INTERRUPTED)
    sys.exit(code)
