"""HTTP API: the KServe v2 / Open Inference Protocol on FastAPI, so ``tritonclient.http`` works.

Endpoints (``{m}`` = ``/v2/models/{name}`` or ``/v2/models/{name}/versions/{version}``; without a
version the newest loaded one answers):

=============================  =====================================================================
``GET /v2``                    server metadata (name, version, extensions)
``GET /v2/health/live``        200 while the process serves
``GET /v2/health/ready``       200 once the repository's initial load is done, else 503
``GET {m}``                    model metadata: name, versions, platform, inputs, outputs
``GET {m}/ready``              200 when the version has live engines, 503 if not, 404 unknown
``GET {m}/config``             Triton's model configuration extension, as JSON
``POST {m}/infer``             inference: JSON tensors and the binary-tensor extension
``POST {m}/infer_stream``      NDJSON in (one v2 JSON request per line), NDJSON out, in order
``GET /metrics``               Prometheus text format
=============================  =====================================================================

Model control and statistics (Triton's extensions: ``/v2/repository/index``,
``/v2/repository/models/{name}/load|unload``, ``/v2/models[/{name}[/versions/{v}]]/stats``) are
:mod:`serving.model_control_routes`.

Errors: every non-200 body is ``{"error": "..."}`` (tritonclient parses only that): 400 bad input
(the message names the input and the model's spec), 401 missing/wrong bearer token, 404 unknown
model/version/route, 413 body over ``body_limit_bytes``, 429 queues full (``Retry-After``), 503 no
live engine (``Retry-After``). FastAPI's own handlers (``{"detail": ...}``, 422) are replaced.

Hot path: the infer routes are plain Starlette routes (no pydantic, no dependency solving), the body
is decoded straight into numpy, and the request is awaited as an asyncio future resolved by the
engine's thread; only models whose measured run time is under ``serving.inline_max_ms`` run inline
in the event loop (see :mod:`serving.dispatcher`).

The routes are a thin adapter: lookup, validation, dispatch, retry on swap, the metadata documents
and the request metrics are :class:`~serving.dataplane.DataPlane`'s, the v2 codec is
:mod:`serving.protocol`. The error bodies live in :mod:`serving.api_errors`, the bearer token in
:mod:`serving.auth`, the body limit in :mod:`serving.request_body` and ``infer_stream`` in
:mod:`serving.ndjson_stream`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.routing import Route

from serving.api_errors import JSON, error_response, install_error_handlers, json_response
from serving.auth import BearerAuth
from serving.dataplane import SERVER_VERSION, DataPlane
from serving.errors import ServingError
from serving.metrics import CONTENT_TYPE
from serving.model_control_routes import model_control_routes
from serving.ndjson_stream import NDJSONStream
from serving.protocol import HEADER_LENGTH, decode_request, encode_response
from serving.request_body import read_body
from serving.settings import ServingConfig


@dataclass
class ApiSettings:
    """The HTTP front end's part of the serve config (:class:`~serving.settings.ServeConfig`)."""

    body_limit_bytes: int = field(default_factory=lambda: ServingConfig().body_limit_bytes)
    token: str | None = None
    #: paths answered without the bearer token (liveness/readiness probes)
    public_paths: tuple[str, ...] = ("/v2/health/live", "/v2/health/ready")


class HttpRoutes:
    """Route handlers bound to a dataplane and the HTTP settings (see :func:`create_app`)."""

    def __init__(self, dataplane: DataPlane, settings: ApiSettings) -> None:
        self.dataplane = dataplane
        self.settings = settings

    # ---- inference

    async def infer(self, request: HttpRequest) -> Response:
        t0 = time.perf_counter()
        dataplane = self.dataplane
        params = request.path_params
        name = params["name"]
        version = params.get("version")
        try:
            pool = await dataplane.acquire(name, version)
            body = await read_body(request, self.settings.body_limit_bytes)
            ireq = decode_request(
                body, request.headers.get(HEADER_LENGTH), pool.signature.input_map
            )
            result = await dataplane.infer(pool, ireq, version)
            payload, header_len = encode_response(
                result.model_name,
                str(result.model_version),
                result.outputs,
                result.output_names,
                ireq,
            )
        except ServingError as exc:
            dataplane.record_failure(name, exc.status)
            return error_response(exc.status, exc.message, exc.headers or None)
        dataplane.record_success(result, time.perf_counter() - t0)
        if header_len is None:
            return Response(payload, media_type=JSON)
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={HEADER_LENGTH: str(header_len)},
        )

    async def infer_stream(self, request: HttpRequest) -> Response:
        params = request.path_params
        await self.dataplane.acquire(params["name"], params.get("version"))  # 404 before the stream
        return NDJSONStream(
            self.dataplane, params["name"], params.get("version"), self.settings.body_limit_bytes
        )

    # ---- metadata

    async def server_metadata(self, request: HttpRequest) -> Response:
        return json_response(self.dataplane.server_metadata())

    async def live(self, request: HttpRequest) -> Response:
        return json_response({"live": True})

    async def ready(self, request: HttpRequest) -> Response:
        ok = self.dataplane.ready()
        return json_response({"ready": ok}, status=200 if ok else 503)

    async def model_metadata(self, request: HttpRequest) -> Response:
        params = request.path_params
        return json_response(self.dataplane.model_metadata(params["name"], params.get("version")))

    async def model_ready(self, request: HttpRequest) -> Response:
        params = request.path_params
        doc = self.dataplane.model_ready(params["name"], params.get("version"))
        return json_response(doc, status=200 if doc["ready"] else 503)

    async def model_config(self, request: HttpRequest) -> Response:
        params = request.path_params
        return json_response(self.dataplane.model_config(params["name"], params.get("version")))

    async def metrics_endpoint(self, request: HttpRequest) -> Response:
        return Response(self.dataplane.metrics.render(), media_type=CONTENT_TYPE)


def create_app(dataplane: DataPlane, *, settings: ApiSettings | None = None) -> FastAPI:
    """The ASGI app serving ``dataplane`` over HTTP."""
    settings = settings or ApiSettings()
    handlers = HttpRoutes(dataplane, settings)
    app = FastAPI(
        title="fedserve", docs_url=None, redoc_url=None, openapi_url=None, version=SERVER_VERSION
    )

    routes: list[tuple[str, Callable[..., Any], list[str]]] = [
        ("/v2", handlers.server_metadata, ["GET"]),
        ("/v2/health/live", handlers.live, ["GET"]),
        ("/v2/health/ready", handlers.ready, ["GET"]),
        ("/metrics", handlers.metrics_endpoint, ["GET"]),
    ]
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [
            (prefix, handlers.model_metadata, ["GET"]),
            (prefix + "/ready", handlers.model_ready, ["GET"]),
            (prefix + "/config", handlers.model_config, ["GET"]),
            (prefix + "/infer", handlers.infer, ["POST"]),
            (prefix + "/infer_stream", handlers.infer_stream, ["POST"]),
        ]
    app.router.routes.extend(model_control_routes(dataplane))  # before /v2/models/{name}
    for path, endpoint, methods in routes:
        app.router.routes.append(Route(path, endpoint, methods=methods))

    install_error_handlers(app)
    if settings.token:
        app.add_middleware(BearerAuth, token=settings.token, public_paths=settings.public_paths)
    return app
