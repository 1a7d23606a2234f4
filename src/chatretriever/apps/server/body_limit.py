"""Refuse request bodies over a size limit (413) before anything parses them.

A pure ASGI middleware: it reads the body up to the limit (checking a declared Content-Length
first, so a too-large upload is refused without reading it), then replays it to the app.
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatretriever.apps.server.errors import error_response

# the smallest body limit: a search for one short question is about 60 bytes, and a limit below a
# few of those refuses every request
MIN_BODY_BYTES = 1024


def check_body_limit(max_bytes: int, name: str = "max_body_bytes") -> None:
    """Refuse a body limit that no useful request fits under.

    Args:
        max_bytes: The limit.
        name: What the caller calls it (`--max-body-bytes` on the command line).
    """
    if max_bytes < MIN_BODY_BYTES:
        raise ValueError(
            f"{name} must be at least {MIN_BODY_BYTES} (a search for one short question takes "
            f"about 60 bytes), got {max_bytes}"
        )


class BodyLimitMiddleware:
    """Answers 413 to a request whose body is larger than `max_bytes`.

    Args:
        app: The ASGI app to protect.
        max_bytes: The largest body accepted, in bytes (`ServerSettings` checks it against
            MIN_BODY_BYTES).
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: int | None = None) -> Any:
        told = f" ({size} bytes)" if size is not None else ""
        return error_response(
            413, f"request body{told} is over the limit of {self.max_bytes} bytes"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response(400, "bad Content-Length header")(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                await self._too_large(int(declared))(scope, receive, send)
                return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._too_large()(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
