"""`chatretriever serve`: the HTTP server over a corpus index (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import logging

from chatretriever.cli.pipeline import (
    add_hybrid_arguments,
    add_runtime_argument,
    refuse_unused_hybrid_options,
    set_runtime,
)
from chatretriever.errors import require_extra

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `serve`."""
    p = sub.add_parser(
        "serve",
        help="serve an index over HTTP: OpenAI-style embeddings, conversational search, a web page",
        description="Serves POST /v1/embeddings, POST /v1/search, GET /v1/models, GET /healthz and "
        "a search page at /. API keys (Authorization: Bearer KEY) come from "
        "CHATRETRIEVER_API_KEYS (comma-separated) or --api-keys-file; without keys the server "
        'starts only with --no-auth on a loopback host. Searches with "hybrid": true fuse '
        "the index's BM25 side (`index --bm25`) as --hybrid says (rrf when not given).",
    )
    p.add_argument("--index", required=True, help="index dir (from `index CORPUS --out DIR`)")
    p.add_argument("--model", help="query encoder (default: the model the index records)")
    p.add_argument("--corpus", help="corpus whose titles/texts to return (default: the index's)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys-file", help="file with one API key per line")
    p.add_argument("--no-auth", action="store_true", help="no API keys (loopback hosts only)")
    p.add_argument("--max-batch", type=int, default=32, help="most requests per forward (1: off)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="wait for a batch to fill")
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=1 << 20,
        help="largest request body (default 1 MiB, at least 1024)",
    )
    p.add_argument(
        "--dtype", choices=["fp32", "bf16", "auto"], help="model precision (default: the model's)"
    )
    add_runtime_argument(p)  # incremental session encoding (KV caches) stays on torch
    add_hybrid_arguments(p)  # the fusion of `"hybrid": true` searches (default rrf)
    p.set_defaults(func=cmd_serve)


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port another process listens on now, before the model is loaded."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ValueError(f"--host {host}: {e}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise ValueError(f"cannot serve on {host}:{port}: {e.strerror}") from None


def cmd_serve(args: argparse.Namespace) -> int:
    from chatretriever.apps.registry import match_precision, query_model, set_precision
    from chatretriever.apps.server.auth import check_auth_settings, load_api_keys
    from chatretriever.cli.chat import _load_encoder
    from chatretriever.retrieval.corpus_index import CorpusIndex

    if not 0 < args.port < 65536 or args.max_batch < 1 or args.max_wait_ms < 0:
        raise ValueError("--port must be 1..65535, --max-batch >= 1 and --max-wait-ms >= 0")
    require_extra("fastapi", purpose="the server")
    uvicorn = require_extra("uvicorn", purpose="the server")
    from chatretriever.apps.server.app import ServerSettings, create_app
    from chatretriever.apps.server.body_limit import check_body_limit

    check_body_limit(args.max_body_bytes, "--max-body-bytes")
    keys = load_api_keys(args.api_keys_file)
    check_auth_settings(keys, args.no_auth, args.host)  # before minutes of model loading
    _check_port_free(args.host, args.port)
    corpus_index = CorpusIndex.load(args.index, corpus=args.corpus)
    model = query_model(args.model, corpus_index, args.index)
    if corpus_index.passages is None:
        logger.warning(
            "%s holds no passage texts: results carry ids only (pass --corpus)", args.index
        )
    hybrid = _hybrid_side(args, corpus_index)  # its settings checked before the model loads
    encoder = _load_encoder(model)
    if args.dtype:
        set_precision(encoder, args.dtype)
    else:  # queries in the precision the index's passages were encoded in
        match_precision(encoder, corpus_index.index.meta.fingerprint)
    set_runtime(encoder, args.runtime)
    if args.runtime != "torch":
        encoder.encode_body()  # converted now, not during the first request
    settings = ServerSettings(
        model=model,
        api_keys=() if args.no_auth else tuple(keys),
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_body_bytes=args.max_body_bytes,
    )
    app = create_app(corpus_index, encoder, settings, hybrid)
    auth = "no auth (loopback)" if args.no_auth else f"{len(keys)} API key(s)"
    print(
        f"chatretriever serve: {len(corpus_index.index)} passages, model {model}, {auth}",
        flush=True,
    )
    print(
        f"  page http://{args.host}:{args.port}/  health http://{args.host}:{args.port}/healthz",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


def _hybrid_side(args: argparse.Namespace, corpus_index):
    """The BM25 side for `"hybrid": true` searches: the index's own (`index ... --bm25`), fused
    as `--hybrid` says (rrf by default); None when the index has none and --hybrid is not given
    (then a fusion option given is refused: nothing would use it)."""
    from chatretriever.apps.chat import HybridSide
    from chatretriever.cli.pipeline import hybrid_side

    if corpus_index.bm25_dir is None and not args.hybrid:
        refuse_unused_hybrid_options(args)
        return None
    args = argparse.Namespace(**{**vars(args), "hybrid": args.hybrid or "rrf"})
    bm25, formulation, fusion, _ = hybrid_side(args, corpus_index)  # checks the settings
    logger.info("hybrid searches: %s fusion with BM25 (%s)", fusion.method, formulation)
    return HybridSide(bm25, formulation, fusion, args.fusion_depth)
