"""The FastAPI app: OpenAI-style embeddings, conversational search, health, models and the page.

    GET  /                          the conversational search page (static/, no build step)
    GET  /healthz                   liveness and counters (no key needed; HEAD too)
    GET  /v1/models                 the served model, OpenAI style
    POST /v1/embeddings             OpenAI-compatible embeddings (+ sessions as input)
    POST /v1/search                 {"messages", "k", "conversation_id"?} -> ranked passages
    DELETE /v1/conversations/{id}   forget a conversation's incremental cache

Model work runs on one worker thread through dynamic batchers (`batcher.py`); the event loop only
parses, validates and answers. `create_app` never checks whether running without keys is allowed:
the command line does (`auth.check_auth_settings`).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

from chatretriever.apps.chat import HybridSide
from chatretriever.apps.server import schemas as S
from chatretriever.apps.server.auth import ApiKeyChecker
from chatretriever.apps.server.batcher import DynamicBatcher
from chatretriever.apps.server.body_limit import BodyLimitMiddleware, check_body_limit
from chatretriever.apps.server.engine import (
    SearchEngine,
    SearchItem,
    SessionInputError,
    make_incremental,
)
from chatretriever.apps.server.errors import ApiError, install_error_handlers
from chatretriever.apps.server.media_type import JsonBodyMiddleware
from chatretriever.retrieval.corpus_index import CorpusIndex
from chatretriever.retrieval.encoders import Encoder
from chatretriever.types import Session

logger = logging.getLogger(__name__)

PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class ServerSettings:
    """What the server is and how it batches and limits requests.

    Attributes:
        model: The name the model is served under (`/v1/models`, the `model` field).
        api_keys: Accepted Bearer keys; empty: no check (the CLI allows that on loopback only).
        max_batch: Most requests per forward (1: one request per forward).
        max_wait_ms: How long a request waits for others to share its forward.
        max_body_bytes: Largest request body (413 beyond); at least `body_limit.MIN_BODY_BYTES`.
        max_queue: Most requests waiting for the model (503 beyond).
        incremental_bytes: Memory budget of the incremental session cache.
    """

    model: str
    api_keys: tuple[str, ...] = ()
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_body_bytes: int = 1 << 20
    max_queue: int = 4096
    incremental_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        check_body_limit(self.max_body_bytes)


_BEARER = HTTPBearer(auto_error=False, description="an API key of the server")


def _client(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
) -> str:
    """The caller's client id (`auth.ApiKeyChecker.client_id`), or a 401."""
    # `creds` only declares the Bearer scheme in the OpenAPI document; the check reads the raw
    # header, so that a malformed one is the same plain 401.
    found = request.app.state.checker.client_id(request.headers.get("authorization"))
    if found is None:
        raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)")
    return found


Client = Annotated[str, Depends(_client)]


def static_dir() -> Path:
    """The page's files, shipped inside the package."""
    return Path(str(resources.files("chatretriever.apps.server") / "static"))


class _Batchers:
    """The three batchers (search, passages, sessions) sharing one model thread."""

    def __init__(self, engine: SearchEngine, settings: ServerSettings) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chatretriever-model")
        opts = dict(
            executor=self.executor,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
        )
        self.search = DynamicBatcher(engine.search_batch, name="search", **opts)
        self.passages = DynamicBatcher(engine.embed_passages, name="passages", **opts)
        self.sessions = DynamicBatcher(engine.embed_sessions, name="sessions", **opts)

    async def executor_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the model thread (after the batches already handed to it)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def counters(self) -> dict[str, int]:
        parts = [b.snapshot() for b in (self.search, self.passages, self.sessions)]
        return {key: sum(p[key] for p in parts) for key in ("batches", "items")}

    async def stop(self) -> None:
        """Stop the collectors (they restart on the next request: test clients run the app's
        lifespan once per client). The idle model thread is left to end with the process."""
        for b in (self.search, self.passages, self.sessions):
            await b.stop()


def create_app(
    index: CorpusIndex,
    encoder: Encoder,
    settings: ServerSettings,
    hybrid: HybridSide | None = None,
) -> FastAPI:
    """The server app over a loaded corpus index and its encoder.

    Args:
        index: The corpus index (its passages give titles and texts); never written to.
        encoder: The model that built the index (checked by fingerprint).
        settings: See `ServerSettings`.
        hybrid: The index's BM25 side for `"hybrid": true` searches, or None.

    Returns:
        The FastAPI app (serve it with uvicorn).
    """
    incremental = make_incremental(encoder, settings.incremental_bytes)
    engine = SearchEngine(encoder, index, incremental, hybrid)
    batchers = _Batchers(engine, settings)
    checker = ApiKeyChecker(list(settings.api_keys))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await batchers.stop()

    app = FastAPI(
        title="chatretriever",
        summary="Conversational retrieval: OpenAI-style embeddings and search over one index.",
        version="1",
        lifespan=lifespan,
    )
    # the last added runs first: the size limit, then the body's declared type
    app.add_middleware(JsonBodyMiddleware, paths=JSON_ROUTES)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    install_error_handlers(app)
    app.state.engine, app.state.batchers, app.state.settings = engine, batchers, settings
    app.state.checker = checker
    _page_routes(app)
    _info_routes(app, engine, batchers, settings)
    _model_routes(app, engine, batchers, settings)
    return app


def _page_routes(app: FastAPI) -> None:
    page = static_dir()
    app.mount("/static", StaticFiles(directory=page), name="static")

    @app.get("/", include_in_schema=False)
    async def index_page() -> FileResponse:
        return FileResponse(page / "index.html", headers=PAGE_HEADERS)


def _info_routes(
    app: FastAPI, engine: SearchEngine, batchers: _Batchers, settings: ServerSettings
) -> None:
    @app.get("/healthz", response_model=S.Health)
    async def healthz() -> S.Health:
        """Liveness and counters; needs no key."""
        return S.Health(
            model=settings.model,
            passages=len(engine.corpus_index.index),
            dim=engine.dim,
            incremental=engine.incremental is not None,
            hybrid=engine.hybrid is not None,
            incremental_stats=engine.incremental_stats(),
            auth=bool(settings.api_keys),
            **batchers.counters(),
        )

    # HEAD too, as GET without the body: load balancers often check with it
    app.head("/healthz", response_model=S.Health, include_in_schema=False)(healthz)

    @app.get("/v1/models", response_model=S.ModelList, responses={401: {"model": S.ErrorResponse}})
    async def models(client_id: Client) -> S.ModelList:
        """The served model (OpenAI's model list shape)."""
        return S.ModelList(data=[S.ModelCard(id=settings.model)])


ERRORS = {c: {"model": S.ErrorResponse} for c in (400, 401, 404, 413, 415, 422, 503)}
JSON_ROUTES = ("/v1/embeddings", "/v1/search")  # the routes that read a JSON body
ConversationId = Annotated[
    str,
    PathParam(
        min_length=1,
        max_length=S.MAX_ID_CHARS,
        pattern=S.ID_PATTERN,
        description="the conversation_id its searches sent",
    ),
]


def _model_routes(
    app: FastAPI, engine: SearchEngine, batchers: _Batchers, settings: ServerSettings
) -> None:
    served = {settings.model, engine.encoder.name}

    @app.post("/v1/embeddings", response_model=S.EmbeddingsResponse, responses=ERRORS)
    async def embeddings(body: S.EmbeddingsRequest, client_id: Client) -> S.EmbeddingsResponse:
        """OpenAI-compatible embeddings: strings are passages, message lists are sessions."""
        if body.model not in served:
            msg = f"model {body.model!r} is not served here; this server serves {settings.model!r}"
            raise ApiError(404, msg, "model", "model_not_found")
        if body.dimensions is not None and body.dimensions != engine.dim:
            raise ApiError(422, f"dimensions: this model gives {engine.dim}", "dimensions")
        kind, items = body.kind_and_items()
        if kind == "passages":
            vectors = await batchers.passages.submit_many(items)
            words = sum(len(t.split()) for t in items)
        else:
            sessions = [
                _session(messages, f"/v1/embeddings input[{i}] of client {client_id}")
                for i, messages in enumerate(items)
            ]
            try:
                vectors = await batchers.sessions.submit_many(sessions)
            except SessionInputError as e:
                raise _refused("input", e) from e
            words = sum(len(m.content.split()) for messages in items for m in messages)
        data = [
            S.Embedding(index=i, embedding=_encode_vector(v, body.encoding_format))
            for i, v in enumerate(vectors)
        ]
        usage = S.Usage(prompt_tokens=words, total_tokens=words)
        return S.EmbeddingsResponse(data=data, model=settings.model, usage=usage)

    @app.post("/v1/search", response_model=S.SearchResponse, responses=ERRORS)
    async def search(body: S.SearchRequest, client_id: Client) -> S.SearchResponse:
        """The top-k passages for the conversation so far (every turn, not only the last)."""
        if body.hybrid and engine.hybrid is None:
            raise ApiError(422, "hybrid: this index has no BM25 side", "hybrid")
        key = f"{client_id}/{body.conversation_id}" if body.conversation_id else None
        session = _session(body.messages, _search_name(client_id, body.conversation_id))
        item = SearchItem(session, body.k, key, hybrid=body.hybrid)
        try:
            hits = await batchers.search.submit(item)
        except SessionInputError as e:
            raise _refused("messages", e) from e
        data = [
            S.SearchHit(rank=h.rank, id=h.doc_id, title=h.title, text=h.text, score=h.score)
            for h in hits
        ]
        return S.SearchResponse(
            model=settings.model, conversation_id=body.conversation_id, data=data
        )

    @app.delete("/v1/conversations/{conversation_id}", status_code=204, responses=ERRORS)
    async def forget(conversation_id: ConversationId, client_id: Client) -> Response:
        """Forget a conversation's incremental cache (the next search encodes it in full)."""
        await batchers.executor_call(engine.reset, f"{client_id}/{conversation_id}")
        return Response(status_code=204)


def _search_name(client_id: str, conversation_id: str | None) -> str:
    """What the server log calls a search's session (the model's warnings name it): the route,
    the client (`auth.ApiKeyChecker.client_id`) and the conversation when it has one."""
    name = f"/v1/search of client {client_id}"
    return f"{name}, conversation {conversation_id}" if conversation_id else name


def _refused(param: str, error: SessionInputError) -> ApiError:
    """The 422 of a session the model refused: the request field and why."""
    return ApiError(422, f"{param}: the model cannot encode this session: {error}", param)


def _session(messages: list[S.Message], session_id: str) -> Session:
    return Session.from_messages(
        session_id, [m.model_dump(include={"role", "content"}) for m in messages]
    )


def _encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A (D,) vector as JSON floats, or as OpenAI's base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return np.asarray(vector, dtype=np.float32).tolist()
