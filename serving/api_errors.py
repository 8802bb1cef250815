"""Every error the HTTP API answers is ``{"error": "<message>"}`` (the only shape tritonclient
parses), with the status code the error maps to.

:func:`install_error_handlers` replaces FastAPI's own handlers (``{"detail": ...}``, 422): a
:class:`~serving.errors.ServingError` keeps its status and headers, an unknown route is a 404
naming method and path, a validation error is a 400, anything else a logged 500.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import Response

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


def install_error_handlers(app: FastAPI) -> None:
    """Make every error ``app`` answers an ``{"error": ...}`` body (see the module docstring)."""

    @app.exception_handler(ServingError)
    async def _serving_error(request: HttpRequest, exc: ServingError) -> Response:
        return error_response(exc.status, exc.message, exc.headers or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HttpRequest, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: HttpRequest, exc: RequestValidationError) -> Response:
        parts = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        ]
        return error_response(400, "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def _internal_error(request: HttpRequest, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}: {exc}")
