"""`python -m chatretriever ...` (e.g. under `torchrun -m`) runs the command line."""

import sys

from chatretriever.cli import main

sys.exit(main())
