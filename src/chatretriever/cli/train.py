"""`chatretriever train RECIPE.yaml [--set key=value ...] [--resume]`."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the train sub-command."""
    p = sub.add_parser(
        "train",
        help="train from a YAML recipe: a ChatRetriever with CSIT, or a UniConv (`method: "
        "uniconv`) (torchrun/accelerate for DDP)",
    )
    p.add_argument("recipe", help="YAML recipe (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set loss.alpha=0 --set training.max_steps=50",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in output_dir"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output_dir that holds another run (its checkpoints are removed)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and stop")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from chatretriever.modeling.recipe import resolved_recipe

    # the method as the recipe and its overrides (`--set method=uniconv`) say
    if resolved_recipe(args.recipe, args.overrides).get("method") == "uniconv":
        from chatretriever.methods.uniconv.recipe import load_recipe, run_training
    else:
        from chatretriever.methods.chatretriever.recipe import load_recipe, run_training

    config = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        import yaml

        yaml.safe_dump(config.to_dict(), sys.stdout, sort_keys=False)
        return 0
    from chatretriever.modeling.distributed import close_process_group

    if args.resume and args.overwrite:
        raise ValueError(
            "--resume continues the run in output_dir, --overwrite replaces it: not both"
        )
    out = run_training(config, resume=args.resume, overwrite=args.overwrite)
    close_process_group()  # after success only: it waits for every rank
    print(f"saved {out}")
    return 0
