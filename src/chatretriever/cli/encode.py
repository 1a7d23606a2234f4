"""`chatretriever encode`: a corpus into fingerprinted, resumable embedding shards."""

from __future__ import annotations

import argparse

from chatretriever.cli.pipeline import _echo, _positive, add_runtime_argument, set_runtime


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the encode sub-command."""
    p = sub.add_parser("encode", help="encode a corpus into embedding shards (resumable)")
    p.add_argument("corpus", help="BEIR corpus JSONL (.gz ok)")
    p.add_argument("--model", required=True, help="minilm-l6, mpnet-base, or a model dir/name")
    p.add_argument("--out", required=True, help="output directory of chunk shards")
    p.add_argument("--shard", default="0/1", help="I/N: this process encodes every N-th chunk")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=10_000, help="passages per shard dir")
    add_runtime_argument(p)
    p.set_defaults(func=cmd_encode)


def cmd_encode(args: argparse.Namespace) -> int:
    from chatretriever.apps.registry import load_encoder
    from chatretriever.io.corpus import iter_corpus
    from chatretriever.retrieval.encode import EncodeConfig, encode_corpus, parse_shard

    config = EncodeConfig(
        batch_size=_positive(args.batch_size, "--batch-size"),
        chunk_size=_positive(args.chunk_size, "--chunk-size"),
        shard=parse_shard(args.shard),
    )
    # A first pass checks the whole corpus (and counts it) before any model is loaded.
    total = sum(1 for _ in iter_corpus(args.corpus))
    encoder = load_encoder(args.model)
    set_runtime(encoder, args.runtime)
    result = encode_corpus(encoder, iter_corpus(args.corpus), args.out, config, total=total)
    _echo(
        f"{result.passages_encoded} passages encoded into {result.chunks_written} chunks, "
        f"{result.chunks_kept} chunks kept from an earlier run -> {result.out_dir}"
    )
    return 0
