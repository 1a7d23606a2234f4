"""The `chatretriever` command: a thin layer over library objects.

Each sub-module registers its sub-commands with `add_parser(subparsers)`; a command function
takes the parsed namespace and returns an exit status.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence

from chatretriever.errors import DataFormatError
from chatretriever.modeling.backbones import ModelNotInstalledError

EXIT_BAD_INPUT = 2


def build_parser() -> argparse.ArgumentParser:
    from chatretriever.cli import build, chat, data, models, pipeline, train

    parser = argparse.ArgumentParser(
        prog="chatretriever", description="Conversational retrieval with chat LLMs."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (data, models, build, pipeline, train, chat):
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # library chatter that says nothing to a user
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
    try:
        return int(args.func(args) or 0)
    except DataFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModelNotInstalledError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
