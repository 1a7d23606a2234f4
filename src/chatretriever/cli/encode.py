"""`chatretriever encode`: a corpus into fingerprinted, resumable embedding shards.

Engines: "local" (this process; under `torchrun` each process takes its shard from RANK and
WORLD_SIZE) and "ray" (a Ray Data actor pool on a running cluster, or on a Ray started here).
"""

from __future__ import annotations

import argparse
import os
from functools import partial
from typing import Any

from chatretriever.cli.pipeline import _echo, _positive, add_runtime_argument, set_runtime
from chatretriever.errors import DataFormatError

ENGINES = ("local", "ray")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the encode sub-command."""
    p = sub.add_parser("encode", help="encode a corpus into embedding shards (resumable)")
    p.add_argument("corpus", help="BEIR corpus JSONL (.gz ok)")
    p.add_argument("--model", required=True, help="minilm-l6, mpnet-base, or a model dir/name")
    p.add_argument("--out", required=True, help="output directory of chunk shards")
    p.add_argument(
        "--shard",
        default=None,
        help="I/N: this process encodes every N-th chunk (default: RANK/WORLD_SIZE under "
        "torchrun, else 0/1)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=10_000, help="passages per shard dir")
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: this process (or each torchrun process); ray: a Ray Data actor pool, one "
        "model per actor, GPUs when the cluster has them (pip install 'chatretriever[ray]')",
    )
    p.add_argument(
        "--address", default=None, help="--engine ray: a running Ray cluster (default: start one)"
    )
    p.add_argument(
        "--actors",
        type=int,
        default=None,
        help="--engine ray: number of actors (default one per GPU, else one per node)",
    )
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "auto"],
        default=None,
        help="compute precision (default: the model's; the shipped models' is auto, bf16 where "
        "the hardware has it): fp32 makes vectors independent of batch composition and "
        "threads, so torchrun, Ray and one process agree to float rounding",
    )
    add_runtime_argument(p)
    p.set_defaults(func=cmd_encode)


def load_with_runtime(name: str, runtime: str, dtype: str | None = None) -> Any:
    """`load_encoder(name)` run with `runtime` (and `dtype` when given): what each Ray actor
    builds (picklable)."""
    from chatretriever.apps.registry import load_encoder, set_precision

    encoder = load_encoder(name)
    if dtype is not None and not set_precision(encoder, dtype):
        raise ValueError(f"--dtype: {name} has no precision to set")
    set_runtime(encoder, runtime)
    return encoder


def cmd_encode(args: argparse.Namespace) -> int:
    from chatretriever.io.corpus import iter_corpus
    from chatretriever.retrieval.encode import EncodeConfig, encode_corpus

    config = EncodeConfig(
        batch_size=_positive(args.batch_size, "--batch-size"),
        chunk_size=_positive(args.chunk_size, "--chunk-size"),
        shard=_resolve_shard(args.shard, args.engine),
    )
    if args.engine == "local" and (args.address is not None or args.actors is not None):
        raise ValueError("--address and --actors go with --engine ray")
    # A first pass checks the whole corpus (and counts it) before any model is loaded.
    total = sum(1 for _ in iter_corpus(args.corpus))
    if total == 0:
        raise DataFormatError(args.corpus, "holds no passages")
    if args.engine == "ray":
        from chatretriever.retrieval.ray_encode import encode_corpus_ray

        factory = partial(load_with_runtime, args.model, args.runtime, args.dtype)
        result = encode_corpus_ray(
            factory,
            iter_corpus(args.corpus),
            args.out,
            config,
            address=args.address,
            num_actors=None if args.actors is None else _positive(args.actors, "--actors"),
            num_gpus_per_actor=None,  # GPUs when the cluster has them
            total=total,
        )
    else:
        _pin_local_accelerator()
        encoder = load_with_runtime(args.model, args.runtime, args.dtype)
        result = encode_corpus(encoder, iter_corpus(args.corpus), args.out, config, total=total)
    _echo(
        f"{result.passages_encoded} passages encoded into {result.chunks_written} chunks, "
        f"{result.chunks_kept} chunks kept from an earlier run -> {result.out_dir}"
    )
    return 0


def _resolve_shard(text: str | None, engine: str) -> tuple[int, int]:
    """--shard, else torchrun's RANK/WORLD_SIZE, else (0, 1); both given must agree."""
    from chatretriever.retrieval.shards import parse_shard, shard_from_env

    launched = shard_from_env()
    if launched is not None and engine == "ray":
        raise ValueError("--engine ray runs from one process: do not start it under torchrun")
    if text is None:
        return launched or (0, 1)
    shard = parse_shard(text)
    if launched is not None and shard != launched:
        raise ValueError(
            f"--shard {text} disagrees with torchrun's RANK={launched[0]} "
            f"WORLD_SIZE={launched[1]}: leave --shard out under torchrun"
        )
    return shard


def _pin_local_accelerator() -> None:
    """Under torchrun with several accelerators, process LOCAL_RANK uses accelerator LOCAL_RANK
    (the models load onto the current one), not all of them the first."""
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None:
        return
    try:
        import torch
    except ImportError:  # a torch-free encoder (an API client, a fake)
        return
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator is not None and accelerator.is_available() and accelerator.device_count() > 1:
        accelerator.set_device_index(int(local_rank) % accelerator.device_count())
