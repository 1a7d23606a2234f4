"""Sub-commands of the retrieval pipeline: index, search (encode: encode.py; evaluate, rewrite:
evaluate.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from chatretriever.apps import registry
from chatretriever.cli.data import add_sessions_arguments, load_sessions
from chatretriever.errors import DataFormatError
from chatretriever.retrieval.fusion import DEFAULT_RRF_K, FUSION_METHODS
from chatretriever.retrieval.index import BACKENDS
from chatretriever.retrieval.search import FORMULATIONS, MISSING_REWRITE

logger = logging.getLogger(__name__)

# = modeling.fast_encode.RUNTIMES, spelled here so that building the parser does not load torch
RUNTIMES = ("torch", "openvino")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the pipeline sub-commands."""
    p = sub.add_parser(
        "index",
        help="build a dense index (Faiss, or Milvus) from a corpus (encode + index) or from "
        "embedding shards",
        description="Give a corpus file to encode it with --model and index it in one step "
        "(DIR/embeddings resumes, DIR/index, DIR/passages.jsonl.gz: `chat --index DIR` then "
        "knows the model and the texts), or give embedding dirs made by `encode`.",
    )
    p.add_argument("sources", nargs="+", metavar="CORPUS|EMB_DIR", help="a corpus or emb dirs")
    p.add_argument("--out", required=True, help="index directory")
    p.add_argument("--model", help=f"encoder of a corpus (default: {registry.DEFAULT_MODEL})")
    p.add_argument("--batch-size", type=int, default=32, help="passages per batch (corpus)")
    p.add_argument(
        "--factory",
        default="Flat",
        help='Faiss factory: "Flat", "HNSW32", "IVF..."; Milvus index: "FLAT" ("Flat"), '
        '"HNSW:M=16,efConstruction=200", "IVF_FLAT:nlist=128", "AUTOINDEX"',
    )
    p.add_argument("--train-size", type=int, default=100_000)
    add_backend_arguments(p)
    p.add_argument(
        "--bm25",
        action="store_true",
        help="also build a BM25 side (DIR/bm25) for `search --hybrid` and `chat --hybrid`",
    )
    p.add_argument(
        "--bm25-formulation",
        choices=FORMULATIONS,
        default="last_turn",
        help="query formulation the BM25 side records as its default",
    )
    add_runtime_argument(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="retrieve passages for sessions into a TREC run")
    add_sessions_arguments(p, judged=True)
    p.add_argument("--out", required=True, help="TREC run file to write")
    p.add_argument("--index", help="index directory (dense search)")
    p.add_argument("--model", help="query encoder (dense search; default: the index's model)")
    p.add_argument("--bm25", metavar="CORPUS", help="search a corpus with BM25 instead")
    p.add_argument("--formulation", choices=FORMULATIONS, default="session")
    p.add_argument("--missing-rewrite", choices=MISSING_REWRITE, default="error")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--params", help='search parameters: Faiss "efSearch=128", "nprobe=16"; Milvus "ef=128"'
    )
    add_hybrid_arguments(p)
    p.set_defaults(func=cmd_search)


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    """`--backend faiss|milvus` and where a Milvus index puts its vectors (index)."""
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="faiss",
        help="what holds the vectors: a Faiss index in DIR (default), or a Milvus collection "
        "that DIR describes (pip install 'chatretriever[milvus]')",
    )
    g = p.add_argument_group("milvus (--backend milvus); a re-run resumes an interrupted load")
    g.add_argument(
        "--uri",
        help="a milvus-lite .db file, or a server: http://host:19530 (default DIR/milvus.db)",
    )
    g.add_argument("--collection", help="collection name (default: DIR's name, sanitised)")
    g.add_argument("--upsert-batch-size", type=int, help="rows per upsert (default 1000)")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="drop a collection of that name holding another model or corpus (default: refuse)",
    )


def _milvus_settings(args: argparse.Namespace):
    """`MilvusSettings` of `--uri ...`; None for the Faiss backend (which takes none of them)."""
    from chatretriever.retrieval.corpus_index import MilvusSettings
    from chatretriever.retrieval.milvus_index import DEFAULT_BATCH
    from chatretriever.retrieval.milvus_spec import parse_index_spec

    given = [args.uri, args.collection, args.upsert_batch_size, args.overwrite or None]
    if args.backend != "milvus":
        if any(v is not None for v in given):
            flags = "--uri, --collection, --upsert-batch-size and --overwrite"
            raise ValueError(f"{flags} go with --backend milvus")
        _refuse_milvus_spec_on_faiss(args.factory)
        return None
    size = DEFAULT_BATCH if args.upsert_batch_size is None else args.upsert_batch_size
    batch = _positive(size, "--upsert-batch-size")
    parse_index_spec(args.factory)  # a bad Milvus --factory fails before any passage is encoded
    return MilvusSettings(args.uri, args.collection, batch, args.overwrite)


def _refuse_milvus_spec_on_faiss(factory: str) -> None:
    """A Milvus index spec given to the Faiss backend, named before any model loads (Faiss's
    own error, after loading, says only that it cannot parse it)."""
    from chatretriever.retrieval.milvus_spec import INDEX_KINDS

    kind = factory.partition(":")[0].strip()
    if kind.upper() in INDEX_KINDS and (":" in factory or kind in INDEX_KINDS):
        raise ValueError(
            f"--factory {factory!r} is a Milvus index spec: add --backend milvus, or give a "
            "Faiss factory string (Flat, HNSW32, IVF1024,Flat, ...)"
        )


# the fusion options' defaults: what the parser gives and what "not given" means without --hybrid
HYBRID_DEFAULTS = {"rrf_k": DEFAULT_RRF_K, "fusion_weight": 0.5, "fusion_depth": 100}


def add_hybrid_arguments(p: argparse.ArgumentParser) -> None:
    """`--hybrid rrf|linear` and its settings (search, chat)."""
    g = p.add_argument_group("hybrid: fuse the dense run with the index's BM25 side")
    g.add_argument("--hybrid", choices=FUSION_METHODS, help="fusion method (default: dense only)")
    g.add_argument(
        "--rrf-k", type=int, default=HYBRID_DEFAULTS["rrf_k"], help="k of reciprocal rank fusion"
    )
    g.add_argument(
        "--fusion-weight",
        type=float,
        default=HYBRID_DEFAULTS["fusion_weight"],
        help="dense weight in [0, 1]; BM25: 1 - it",
    )
    g.add_argument(
        "--bm25-formulation",
        choices=FORMULATIONS,
        help="BM25 side's query formulation (default: the one the index records)",
    )
    g.add_argument(
        "--fusion-depth",
        type=int,
        default=HYBRID_DEFAULTS["fusion_depth"],
        help="hits of each side fused (at least --k)",
    )


def refuse_unused_hybrid_options(args: argparse.Namespace) -> None:
    """Without --hybrid nothing is fused: a fusion option given then would be silently ignored."""
    if args.hybrid:
        return
    given = [k for k, v in HYBRID_DEFAULTS.items() if getattr(args, k) != v]
    given += ["bm25_formulation"] if args.bm25_formulation else []
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        verb = "applies" if len(given) == 1 else "apply"
        raise ValueError(f"{flags} {verb} only with --hybrid rrf|linear (nothing is fused without)")


def add_runtime_argument(p: argparse.ArgumentParser) -> None:
    """`--runtime torch|openvino`: what runs an LLM embedder's body (encode, index, serve)."""
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="torch",
        help="body runtime of ChatRetriever/UniConv models: torch (default), or openvino "
        "(CPU; converted once at the first encode; pip install 'chatretriever[openvino]')",
    )


def set_runtime(encoder: Any, runtime: str) -> None:
    """Runs an LLM embedder's fast path with `runtime` (`FastEncodeSettings.runtime`).

    Args:
        encoder: The loaded encoder.
        runtime: One of RUNTIMES; "torch" leaves the encoder as it is.

    Raises:
        ValueError: Another runtime for an encoder that is no LLM embedder, or on a GPU.
        MissingExtraError: openvino is not installed.
    """
    if runtime == "torch":
        return
    from chatretriever.modeling.emb_llm import EmbLLM
    from chatretriever.modeling.fast_encode import resolved
    from chatretriever.modeling.ov_runtime import check_device, require_openvino

    if not isinstance(encoder, EmbLLM):
        name = getattr(encoder, "name", type(encoder).__name__)
        raise ValueError(f"--runtime {runtime} runs ChatRetriever/UniConv models, not {name}")
    require_openvino()  # fail before any encoding (or serving) starts
    check_device(encoder.device)
    settings = resolved(encoder.encode_settings, encoder.device)
    encoder.encode_settings = replace(settings, runtime=runtime)


def hybrid_side(args: argparse.Namespace, corpus_index) -> tuple:
    """The BM25 side, its formulation and the FusionConfig of `--hybrid` (checked first).

    Returns:
        (BM25Retriever, formulation, FusionConfig, settings to record).
    """
    from chatretriever.retrieval.fusion import FusionConfig

    fusion = FusionConfig(args.hybrid, args.rrf_k, args.fusion_weight)
    _positive(args.fusion_depth, "--fusion-depth")
    bm25 = corpus_index.load_bm25()
    if bm25 is None:
        raise ValueError(
            f"{corpus_index.directory} has no BM25 side: rebuild it with `index CORPUS --out DIR "
            "--bm25` (finished embedding chunks are kept)"
        )
    side = corpus_index.bm25_dir
    formulation = args.bm25_formulation or bm25.info.get("formulation", "last_turn")
    settings = {
        "fusion": fusion.to_dict(),
        # the depth fused: never below the hits a query returns (`search.search_hybrid`)
        "fusion_depth": max(args.fusion_depth, getattr(args, "k", 0)),
        "bm25_formulation": formulation,
        "bm25": {"dir": str(side), **bm25.settings, **bm25.info},
    }
    return bm25, formulation, fusion, settings


def _echo(text: str) -> None:
    """Command output goes to stdout (logging goes to stderr)."""
    sys.stdout.write(text + "\n")


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise ValueError(f"{flag} must be positive, got {value}")
    return value


def cmd_index(args: argparse.Namespace) -> int:
    from chatretriever.retrieval.corpus_index import build_milvus
    from chatretriever.retrieval.encode import list_shards
    from chatretriever.retrieval.index import DenseIndex

    milvus = _milvus_settings(args)
    files = [p for p in args.sources if Path(p).is_file()]
    if files:
        return _index_corpus(args, files, milvus)
    if args.model:
        raise ValueError("--model encodes a corpus file; embedding dirs are already encoded")
    if args.runtime != "torch":
        raise ValueError("--runtime encodes a corpus file; embedding dirs are already encoded")
    if args.bm25:
        raise ValueError("--bm25 needs the passages: give a corpus file, not embedding dirs")
    shards = list_shards(args.sources)
    settings: dict[str, Any] = {"emb_dirs": [str(p) for p in args.sources]}
    if milvus is not None:
        index, built_with = build_milvus(shards, args.out, args.factory, milvus, True)
    else:
        index = DenseIndex.build(
            shards, factory=args.factory, train_size=args.train_size, show_progress=True
        )
        built_with = {"train_size": args.train_size}
    index.save(args.out, settings={**settings, "backend": args.backend, **built_with})
    _echo_index(index, args.out)
    return 0


def _echo_index(index, out: str) -> None:
    _echo(
        f"indexed {len(index)} passages ({index.factory}, {index.meta.model}) -> {out}; "
        f"memory {index.memory_bytes} bytes ({index.memory_bytes / 2**20:.1f} MiB)"
    )


def _index_corpus(args: argparse.Namespace, files: list[str], milvus: Any) -> int:
    """`index CORPUS --out DIR`: encode (resumable), index and keep the passages in DIR."""
    from chatretriever.apps.registry import DEFAULT_MODEL, load_encoder
    from chatretriever.io.corpus import iter_corpus
    from chatretriever.retrieval.corpus_index import build_corpus_index
    from chatretriever.retrieval.encode import EncodeConfig

    if len(args.sources) != 1:
        raise ValueError(f"give one corpus file, or embedding dirs only (got {args.sources})")
    corpus = files[0]
    for _ in iter_corpus(corpus):  # a bad corpus fails before the model loads
        pass
    model = args.model or DEFAULT_MODEL
    config = EncodeConfig(batch_size=_positive(args.batch_size, "--batch-size"))
    encoder = load_encoder(model)
    set_runtime(encoder, args.runtime)
    built = build_corpus_index(
        encoder,
        model,
        corpus,
        args.out,
        args.factory,
        config,
        train_size=args.train_size,
        backend=args.backend,
        milvus=milvus,
        bm25=args.bm25_formulation if args.bm25 else None,
    )
    _echo_index(built.index, args.out)
    if args.bm25:
        _echo(
            f"BM25 side: {len(built.index)} passages ({args.bm25_formulation}) -> {built.bm25_dir}"
        )
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from chatretriever.retrieval.search import save_run

    _positive(args.k, "--k")
    if args.bm25 and (args.index or args.model):
        raise ValueError(
            "--bm25 CORPUS searches with BM25 alone: drop --index/--model "
            "(dense + BM25: --index DIR --hybrid rrf|linear)"
        )
    if not (args.bm25 or args.index or args.model):
        raise ValueError("give either --bm25 CORPUS, or --index DIR with --model NAME")
    if args.bm25 and args.hybrid:
        raise ValueError("--hybrid fuses a dense index with its BM25 side: give --index DIR")
    refuse_unused_hybrid_options(args)
    sessions = load_sessions(args)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    if args.bm25:
        from chatretriever.io.corpus import read_corpus
        from chatretriever.retrieval.bm25 import BM25Retriever

        passages = read_corpus(args.bm25)
        if not passages:
            raise DataFormatError(args.bm25, "holds no passages")
        retriever = BM25Retriever(passages)
        settings["bm25"] = {"corpus": args.bm25, **retriever.settings}
        run = retriever.search(sessions, args.k, args.formulation, args.missing_rewrite)
    else:
        run, settings["model"], settings["hybrid"] = _search_dense(args, sessions)
    n = save_run(args.out, run, settings, depth=args.k)
    empty = [s.id for s in sessions if not run.scores.get(s.id)] if args.bm25 else []
    if empty:  # BM25 finds nothing when no query term is in the corpus; evaluate counts them 0
        logger.warning(
            "%d of %d queries got no results (first: %r): no term of theirs is in the corpus",
            len(empty),
            len(sessions),
            empty[0],
        )
    _echo(f"{len(run.scores)} queries, {n} lines -> {args.out}")
    return 0


def _search_dense(args: argparse.Namespace, sessions: list) -> tuple:
    """The dense (or, with --hybrid, fused) run, the model name it used (--model, else the one
    the index records) and the hybrid settings ({} without --hybrid)."""
    from chatretriever.apps.registry import load_encoder, match_precision, query_model
    from chatretriever.retrieval.corpus_index import CorpusIndex
    from chatretriever.retrieval.encoders import fingerprint_of
    from chatretriever.retrieval.search import search_dense, search_hybrid

    if not args.index:
        raise ValueError("dense search needs --index DIR (and --model NAME unless DIR records it)")
    loaded = CorpusIndex.load(args.index, with_passages=False)
    model = query_model(args.model, loaded, args.index)
    side = hybrid_side(args, loaded) if args.hybrid else None  # before the model loads
    encoder = load_encoder(model)
    match_precision(encoder, loaded.index.meta.fingerprint)  # the passages' precision
    fingerprint = fingerprint_of(encoder)  # checked before any query is encoded
    loaded.index.check_encoder(encoder.name, encoder.dim, encoder.normalize, fingerprint)
    check_params = getattr(loaded.index, "set_search_params", None)
    if args.params and check_params is not None:
        check_params(args.params)  # before any query is encoded
    dense_kwargs = {
        "formulation": args.formulation,
        "batch_size": _positive(args.batch_size, "--batch-size"),
        "missing_rewrite": args.missing_rewrite,
        "params": args.params,
    }
    if side is None:
        return search_dense(encoder, loaded.index, sessions, k=args.k, **dense_kwargs), model, {}
    bm25, formulation, fusion, hybrid = side
    run = search_hybrid(
        encoder,
        loaded.index,
        bm25,
        sessions,
        k=args.k,
        fusion=fusion,
        sparse_formulation=formulation,
        depth=args.fusion_depth,
        **dense_kwargs,
    )
    return run, model, hybrid
