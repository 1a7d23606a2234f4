"""Every failure as a 4xx/5xx JSON body in the OpenAI error shape, never a traceback.

`{"error": {"message", "type", "param", "code"}}`: the `openai` client reads this shape, and a
person reads `message`, which names the field and what was wrong with it.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from chatretriever.apps.server.batcher import BatcherBusyError

logger = logging.getLogger(__name__)

MAX_REPORTED = 5  # validation problems listed in one message

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    503: "server_busy",
}


class ApiError(Exception):
    """An error answer: HTTP status, a message for people, and the request field at fault.

    Args:
        status: The HTTP status code.
        message: What was wrong, naming the field and limit.
        param: The request field at fault, if any.
        code: A short machine-readable code ("model_not_found", ...).
    """

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The JSON error answer (see the module docstring)."""
    body = {"message": message, "type": _TYPES.get(status, "server_error")}
    body.update(param=param, code=code)
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _where(loc: tuple[Any, ...] | list[Any]) -> str:
    """A pydantic location as a path ("messages.0.role"), without union branch names and without
    where in the request it was ("body", "path"), as OpenAI names params."""
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p == "str"))]
    if len(parts) > 1 and parts[0] in ("body", "path", "query"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One line for pydantic's errors: the first few, each "field: problem"; and the first field."""
    lines, first = [], None
    for err in errors:
        where = _where(err.get("loc", ()))
        ctx = err.get("ctx") or {}
        if err.get("type") == "json_invalid":
            line = f"body: invalid JSON ({ctx.get('error', 'cannot parse')})"
            where = "body"
        elif getattr(ctx.get("error"), "param", None):
            # a model validator's rule over one field (`schemas.FieldError`): pydantic places it
            # at the whole body, the error names the field
            where, line = ctx["error"].param, str(ctx["error"])
        else:
            line = f"{where}: {str(err.get('msg', 'invalid')).removeprefix('Value error, ')}"
        if line not in lines:
            lines.append(line)
        first = first or where
    more = len(lines) - MAX_REPORTED
    text = "; ".join(lines[:MAX_REPORTED]) + (f"; and {more} more" if more > 0 else "")
    return text, first


# what FastAPI raises (as a 400) when reading the JSON body fails other than by a JSONDecodeError
_FASTAPI_BODY_ERROR = "There was an error parsing the body"


def install_error_handlers(app: FastAPI) -> None:
    """Map validation errors to 422, HTTP errors to their status, busy to 503, the rest to 500
    (logged with its traceback on the server, a plain message to the client)."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.message, exc.param, exc.code, headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(exc.errors()))
        return error_response(422, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == _FASTAPI_BODY_ERROR:
            # a body json.loads could not take other than by a JSONDecodeError (bytes that are
            # not UTF-8, nesting deeper than the parser's limit): bad JSON, a 422 like the rest
            message = "body: invalid JSON (not UTF-8 text, or nested too deeply)"
            return error_response(422, message, "body")
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(BatcherBusyError)
    async def _busy(request: Request, exc: BatcherBusyError) -> JSONResponse:
        return error_response(
            503, "the server is busy: retry shortly", headers={"Retry-After": "1"}
        )

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, "internal error (see the server log)")
