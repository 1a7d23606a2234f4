"""The `chatretriever` command: a thin layer over library objects.

Each sub-module registers its sub-commands with `add_parser(subparsers)`; a command function
takes the parsed namespace and returns an exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from chatretriever.errors import DataFormatError, as_missing_extra
from chatretriever.modeling.sources import ModelNotInstalledError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as shells report a reader that went away


def build_parser() -> argparse.ArgumentParser:
    from chatretriever.cli import (
        answer,
        build,
        chat,
        data,
        encode,
        evaluate,
        items,
        models,
        pipeline,
        rerank,
        robustness,
        serve,
        train,
    )

    parser = argparse.ArgumentParser(
        prog="chatretriever", description="Conversational retrieval with chat LLMs."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = (
        data,
        models,
        build,
        encode,
        pipeline,
        evaluate,
        answer,
        train,
        chat,
        serve,
        rerank,
        items,
        robustness,
    )
    for module in modules:
        module.add_parser(sub)
    return parser


class _QuietThirdParty(logging.Filter):
    """Passes our own INFO lines; other libraries' records only from WARNING up."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == "chatretriever" or record.name.startswith("chatretriever.")
        return ours or record.levelno >= logging.WARNING


def configure_logging(verbose: bool) -> None:
    """The CLI is the only place that configures logging. Quiet by default: our INFO lines and
    everyone's warnings; `-v` shows every library's DEBUG lines too (bm25s, faiss, transformers).
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_chatretriever", False):
            root.removeHandler(h)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler._chatretriever = True  # type: ignore[attr-defined]
    if not verbose:
        handler.addFilter(_QuietThirdParty())
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except DataFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModelNotInstalledError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ImportError as e:
        # A missing optional extra (faiss, ir_measures, bm25s, torch, ...) is one line naming the
        # `pip install` to run; any other import error is a bug and keeps its traceback.
        missing = as_missing_extra(e)
        if missing is None:
            raise
        print(f"error: {missing}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        # the reader of stdout went away (`... | head`): as the Unix tools do, stop quietly,
        # pointing stdout at devnull so the interpreter's final flush cannot fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except OSError as e:
        # the file system said no (a directory where a file goes, permissions, a full disk):
        # one line naming the path, as for bad input
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        # every writer is atomic: what was finished (chunks, checkpoints, cached generations) is
        # kept, and the resumable commands pick up from it
        print(
            f"interrupted: finished work is kept ({args.command} resumes where it can)",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
