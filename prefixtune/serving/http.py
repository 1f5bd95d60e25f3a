"""HTTP plumbing of the server: the one error shape and the statuses documented with it, the body-size
limit, the middleware that turns any unexpected exception into a JSON 500, the per-key limit on requests
in flight, and the route templates that label metrics."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.routing import Match

from ..model import NAME_CHARS

PREFIX_NAME = f"^{NAME_CHARS}$"  # the schema's pattern for prefix names


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


class ErrorDetail(BaseModel):
    message: str = Field(description="what went wrong and what to change")
    field: str | None = Field(description="the request field at fault, if one is")


class ErrorBody(BaseModel):
    """Every error the server returns, whatever its status."""

    error: ErrorDetail


_STATUS = {
    400: "a value the server's limits refuse (input too long, too many inputs, text that cannot be encoded)",
    401: "missing or wrong API key (only when the server has keys)",
    403: "this API key may use the prefix but not manage it",
    404: "unknown prefix",
    429: "this API key has its most requests in flight (--max-requests-per-key)",
    413: "request body, or an uploaded or loaded prefix, over the server's limits (bytes, tokens, memory budget)",
    422: "a field missing, of the wrong type or outside its bounds",
    500: "the request failed while decoding, or an unexpected error (the server goes on)",
    504: "the request took longer than the server's timeout",
}


def documented(*statuses: int) -> dict:
    """OpenAPI responses: the given error statuses and those every route may return, all as ``ErrorBody``."""
    return {code: {"model": ErrorBody, "description": _STATUS[code]} for code in sorted({*statuses, 401, 422, 500})}


def error_response(status: int, message: str, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "field": field}}, status_code=status)


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413, declared or streamed.

    The body is read (up to the limit) before the app sees it, then replayed.
    """

    def __init__(self, app, limit: int, upload_limit: int) -> None:
        self.app, self.limit, self.upload_limit = app, limit, upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.upload_limit if scope["path"] == "/v1/prefixes" else self.limit
        too_large = error_response(413, f"request body over {limit} bytes", "body")
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # later reads wait for the client to disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class Unexpected:
    """ASGI middleware: an exception no handler took becomes a JSON 500 in the server's error shape, so the
    client gets JSON and its keep-alive connection stays usable; the traceback goes to the log."""

    def __init__(self, app, on_error) -> None:
        self.app, self.on_error = app, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception as e:  # noqa: BLE001 - answered, never raised to the server
            logging.getLogger("prefixtune.serve").exception("unexpected error on %s", scope.get("path"))
            self.on_error(scope)
            if started:  # a stream already under way: end it
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await error_response(500, f"internal error: {type(e).__name__}")(scope, receive, send)


class InFlight:
    """Generation requests in flight per API key: one key's flood is answered 429 instead of queueing ahead
    of everyone else. (The event loop is one thread, so plain counters suffice.)"""

    def __init__(self, limit: int) -> None:
        self.limit, self.count = limit, {}

    def enter(self, key: str) -> str:
        if self.count.get(key, 0) >= self.limit:
            raise ApiError(429, f"this API key has {self.limit} requests in flight; retry when one finishes")
        self.count[key] = self.count.get(key, 0) + 1
        return key

    def leave(self, key: str) -> None:
        self.count[key] -= 1
        if not self.count[key]:
            del self.count[key]


def route_label(app, scope) -> str:
    """The route template a request matches (``/v1/prefixes/{name}``), never its raw path: metric labels
    stay a small fixed set whatever clients send."""
    for route in app.router.routes:
        if route.matches(scope)[0] == Match.FULL:
            return route.path
    return "unmatched"
