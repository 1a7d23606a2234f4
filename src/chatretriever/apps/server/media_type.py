"""Refuse request bodies that are not plain JSON (415) before anything parses them.

A body sent as a form (curl's `-d` without `-H 'Content-Type: application/json'`), as text, or
compressed would otherwise reach the JSON parser and come back as a misleading 422 ("Input should
be a valid dictionary", "invalid JSON") for a body that is valid JSON.
"""

from __future__ import annotations

from collections.abc import Collection

from starlette.types import ASGIApp, Receive, Scope, Send

from chatretriever.apps.server.errors import error_response

JSON = "application/json"


def _is_json(content_type: str) -> bool:
    """application/json or application/*+json (with any parameters), as FastAPI reads it."""
    media = content_type.split(";")[0].strip().lower()
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def body_problem(headers: dict[bytes, bytes]) -> str | None:
    """Why a request body with these headers cannot be read as JSON, or None when it can.

    Args:
        headers: The request's headers (lower-case names, as ASGI gives them).
    """
    content_type = headers.get(b"content-type", b"").decode("latin-1")
    if not _is_json(content_type):
        got = f"got {content_type!r}" if content_type else "none was sent"
        return f"Content-Type must be {JSON} ({got}; with curl: -H 'Content-Type: {JSON}')"
    encoding = headers.get(b"content-encoding", b"").decode("latin-1").strip().lower()
    if encoding not in ("", "identity"):
        return f"Content-Encoding {encoding} is not supported: send the JSON body uncompressed"
    return None


class JsonBodyMiddleware:
    """Answers 415 to a POST to one of `paths` whose body is not declared as plain JSON.

    Args:
        app: The ASGI app to protect.
        paths: The routes that read a JSON body (other paths answer as they do: 404, 405).
    """

    def __init__(self, app: ASGIApp, paths: Collection[str]) -> None:
        self.app = app
        self.paths = frozenset(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            problem = body_problem(dict(scope.get("headers") or []))
            if problem is not None:
                await error_response(415, problem)(scope, receive, send)
                return
        await self.app(scope, receive, send)
