"""Every error the HTTP API answers is ``{"error": "<message>"}`` (the only shape tritonclient
parses), with the status code the error maps to.

:func:`install_error_handlers` makes the app's own errors that shape: a
:class:`~serving.errors.ServingError` keeps its status and headers, an unknown route is a 404
naming method and path, a wrong method 405. :class:`InternalErrors` turns anything else a route
raises into one logged 500 on a connection that stays open (uvicorn would print the traceback a
second time and drop the keep-alive connection).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import ServingError

log = logging.getLogger(__name__)

JSON = "application/json"


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``doc`` serialised as an ``application/json`` response."""
    return Response(json.dumps(doc).encode(), status_code=status, media_type=JSON, headers=headers)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """A ``{"error": message}`` response with ``status``."""
    body = json.dumps({"error": message}).encode()
    return Response(body, status_code=status, media_type=JSON, headers=headers)


def install_error_handlers(app: Starlette) -> None:
    """Make every error ``app`` answers an ``{"error": ...}`` body (see the module docstring)."""

    async def serving_error(request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, ServingError)
        return error_response(exc.status, exc.message, exc.headers or None)

    async def http_error(request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, getattr(exc, "headers", None))

    app.add_exception_handler(ServingError, serving_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


class InternalErrors:
    """ASGI middleware: an exception escaping the app before its response started is logged once
    and answered ``500 {"error": ...}``; the connection stays usable. (After the response started
    nothing can be answered: the exception goes on and the server closes the connection.)"""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:
                raise
            log.exception("internal error on %s %s", scope.get("method"), scope.get("path"))
            response = error_response(500, f"internal server error: {type(exc).__name__}: {exc}")
            await response(scope, receive, send)
