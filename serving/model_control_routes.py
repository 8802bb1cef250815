"""HTTP routes of Triton's model repository (explicit model control) and statistics extensions.

=============================================  =====================================================
``POST /v2/repository/index``                  every version the repository serves, with its state
                                               and reason (body ``{"ready": true}``: loaded only)
``POST /v2/repository/models/{m}/load``        load ``m`` now (again after an unload): 200 ``{}``;
                                               404 not in the repository; 400 with the reason when
                                               it fails to load (the old state stays)
``POST /v2/repository/models/{m}/unload``      unload ``m``; it stays unloaded until loaded
``GET /v2/models[/{m}[/versions/{v}]]/stats``  ``{"model_stats": [...]}`` in Triton's shape
=============================================  =====================================================

Bodies are optional JSON objects (``{"parameters": {...}}`` for load/unload, as
``tritonclient.http``'s ``load_model``/``unload_model`` send them), at most 64 KiB. The routes
are thin: the work is :class:`~serving.dataplane.DataPlane`'s. ``/v2/models/stats`` must be
matched before ``/v2/models/{name}``, so :func:`model_control_routes` goes first in the app's
route list.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.routing import Route

from serving.api_errors import error_response, json_response
from serving.dataplane import FrontEndPlane
from serving.errors import BadRequest, ServingError
from serving.request_body import read_body

#: control bodies are tiny; anything bigger is not one
CONTROL_BODY_LIMIT = 64 * 1024
#: what a 413 names as the limit (not serving.body_limit_bytes: raising that would not help)
CONTROL_LIMIT_NAME = 'the model control limit; send only {"parameters": {...}}'

Handler = Callable[[HttpRequest], Awaitable[Response]]


def model_control_routes(dataplane: FrontEndPlane) -> list[Route]:
    """The routes, bound to ``dataplane`` (put them before the model routes)."""

    def guarded(handler: Callable[[HttpRequest], Awaitable[Any]]) -> Handler:
        async def endpoint(request: HttpRequest) -> Response:
            try:
                return json_response(await handler(request))
            except ServingError as exc:
                return error_response(exc.status, exc.message, exc.headers or None)

        return endpoint

    async def index(request: HttpRequest) -> Any:
        body = await _json_object(request)
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise BadRequest(f"'ready' must be true or false, got {ready!r}")
        return await dataplane.repository_index(ready_only=ready)

    async def load(request: HttpRequest) -> Any:
        body = await _json_object(request)
        await dataplane.load_model(request.path_params["name"], _parameters(body))
        return {}

    async def unload(request: HttpRequest) -> Any:
        body = await _json_object(request)
        await dataplane.unload_model(request.path_params["name"], _parameters(body))
        return {}

    async def stats(request: HttpRequest) -> Any:
        params = request.path_params
        return await dataplane.model_statistics(params.get("name"), params.get("version"))

    return [
        Route("/v2/repository/index", guarded(index), methods=["POST"]),
        Route("/v2/repository/models/{name}/load", guarded(load), methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", guarded(unload), methods=["POST"]),
        Route("/v2/models/stats", guarded(stats), methods=["GET"]),
        Route("/v2/models/{name}/stats", guarded(stats), methods=["GET"]),
        Route("/v2/models/{name}/versions/{version}/stats", guarded(stats), methods=["GET"]),
    ]


async def _json_object(request: HttpRequest) -> dict[str, Any]:
    """The body as a JSON object; an empty body is ``{}``."""
    raw = await read_body(request, CONTROL_BODY_LIMIT, CONTROL_LIMIT_NAME)
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(doc).__name__}")
    return doc


def _parameters(body: dict[str, Any]) -> dict[str, Any]:
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise BadRequest(f"'parameters' must be a JSON object, got {type(parameters).__name__}")
    return parameters
