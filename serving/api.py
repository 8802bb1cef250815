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
(the message names the input and the model's spec) or a ``Host`` not in ``serving.allowed_hosts``,
401 missing/wrong bearer token, 404 unknown model/version/route, 413 body over
``body_limit_bytes``, 429 queues full (``Retry-After``), 503 no live engine (``Retry-After``); a bug
is one logged 500 and the keep-alive connection stays open.

Hot path: the infer routes are plain Starlette routes (no pydantic, no dependency solving), the body
is decoded straight into numpy (a JSON body over ``serving.json_offload_bytes`` in a helper
process, :mod:`serving.json_offload`, so it stalls no other request), and the request is awaited
as an asyncio future resolved by the engine's thread; only models whose measured run time is
under ``serving.inline_max_ms`` run inline in the event loop (see :mod:`serving.dispatcher`).

The routes are a thin adapter: lookup, validation, dispatch, retry on swap, the metadata documents
and the request metrics are :class:`~serving.dataplane.DataPlane`'s, the v2 codec is
:mod:`serving.protocol`. The error bodies live in :mod:`serving.api_errors`, the bearer token and
the Host check in :mod:`serving.auth`, the body limit in :mod:`serving.request_body` and
``infer_stream`` in :mod:`serving.ndjson_stream`; the server (connection limits, timeouts, drain)
is :mod:`serving.http_server`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.api_errors import (
    InternalErrors,
    error_response,
    install_error_handlers,
    json_response,
)
from serving.auth import AllowedHosts, BearerAuth
from serving.dataplane import FrontEndPlane
from serving.errors import ServingError
from serving.inference import InferRequest
from serving.json_offload import JsonDecoder
from serving.metrics import CONTENT_TYPE
from serving.model_control_routes import model_control_routes
from serving.ndjson_stream import NDJSONStream
from serving.protocol import encode_response
from serving.request_body import receive_body
from serving.settings import ServingConfig
from serving.tensor_spec import TensorSpec


@dataclass
class ApiSettings:
    """The HTTP front end's part of the serve config (:class:`~serving.settings.ServeConfig`)."""

    body_limit_bytes: int = field(default_factory=lambda: ServingConfig().body_limit_bytes)
    token: str | None = None
    #: paths answered without the bearer token (liveness/readiness probes)
    public_paths: tuple[str, ...] = ("/v2/health/live", "/v2/health/ready")
    #: Host header values accepted; None: any
    allowed_hosts: list[str] | None = None
    json_offload_bytes: int | None = field(
        default_factory=lambda: ServingConfig().json_offload_bytes
    )
    json_offload_processes: int = 1

    @classmethod
    def from_config(cls, serving: ServingConfig, token: str | None) -> ApiSettings:
        return cls(
            body_limit_bytes=serving.body_limit_bytes,
            token=token or None,
            allowed_hosts=serving.allowed_hosts,
            json_offload_bytes=serving.json_offload_bytes,
            json_offload_processes=serving.json_offload_processes,
        )


class HttpRoutes:
    """Route handlers bound to a dataplane and the HTTP settings (see :func:`create_app`)."""

    def __init__(
        self, dataplane: FrontEndPlane, settings: ApiSettings, decoder: JsonDecoder
    ) -> None:
        self.dataplane = dataplane
        self.settings = settings
        self.decoder = decoder

    # ---- inference

    async def infer(
        self, name: str, version: str | None, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """``POST .../infer`` as a raw ASGI handler (the hot path: no router, no Request or
        Response objects); every ServingError becomes its ``{"error": ...}`` answer."""
        t0 = time.perf_counter()
        dataplane = self.dataplane
        length = encoding = header_length = None
        for key, value in scope["headers"]:
            if key == b"content-length":
                length = value
            elif key == b"inference-header-content-length":
                header_length = value.decode("latin-1")
            elif key == b"content-encoding":
                encoding = value
        read: list[bytes | ServingError] = []  # the body, or why it could not be read

        async def decode(specs: Mapping[str, TensorSpec] | None) -> InferRequest:
            if not read:  # read once: a second decode (with specs) re-reads nothing
                limit = self.settings.body_limit_bytes
                try:
                    read.append(await receive_body(receive, length, encoding, limit))
                except ServingError as exc:
                    read.append(exc)
            body = read[0]
            if isinstance(body, ServingError):
                raise body
            return await self.decoder.decode(body, header_length, specs)

        try:
            ireq, result = await dataplane.infer_with(name, version, decode)
            payload, header_len = encode_response(
                result.model_name,
                str(result.model_version),
                result.outputs,
                result.output_names,
                ireq,
            )
        except ServingError as exc:
            dataplane.record_failure(name, exc.status)
            await error_response(exc.status, exc.message, exc.headers or None)(scope, receive, send)
            return
        dataplane.record_success(result, time.perf_counter() - t0)
        if header_len is None:
            headers = [(b"content-type", b"application/json")]
        else:
            headers = [
                (b"content-type", b"application/octet-stream"),
                (b"inference-header-content-length", str(header_len).encode()),
            ]
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def infer_stream(self, request: HttpRequest) -> Response:
        params = request.path_params
        await self.dataplane.input_specs(params["name"], params.get("version"))  # 404 first
        return NDJSONStream(
            self.dataplane,
            params["name"],
            params.get("version"),
            self.settings.body_limit_bytes,
            self.decoder,
        )

    # ---- metadata

    async def server_metadata(self, request: HttpRequest) -> Response:
        return json_response(await self.dataplane.server_metadata())

    async def live(self, request: HttpRequest) -> Response:
        return json_response({"live": True})

    async def ready(self, request: HttpRequest) -> Response:
        ok = await self.dataplane.ready()
        body: dict[str, Any] = {"ready": ok}
        if not ok and (reason := await self.dataplane.not_ready_reason()):
            body["reason"] = reason
        return json_response(body, status=200 if ok else 503)

    async def model_metadata(self, request: HttpRequest) -> Response:
        params = request.path_params
        return json_response(
            await self.dataplane.model_metadata(params["name"], params.get("version"))
        )

    async def model_ready(self, request: HttpRequest) -> Response:
        params = request.path_params
        doc = await self.dataplane.model_ready(params["name"], params.get("version"))
        return json_response(doc, status=200 if doc["ready"] else 503)

    async def model_config(self, request: HttpRequest) -> Response:
        params = request.path_params
        return json_response(
            await self.dataplane.model_config(params["name"], params.get("version"))
        )

    async def metrics_endpoint(self, request: HttpRequest) -> Response:
        return Response(await self.dataplane.metrics_text(), media_type=CONTENT_TYPE)


def create_app(
    dataplane: FrontEndPlane,
    *,
    settings: ApiSettings | None = None,
    decoder: JsonDecoder | None = None,
) -> ASGIApp:
    """The ASGI app serving ``dataplane`` over HTTP (``decoder``: the big-JSON decoder to share
    with other front ends; by default one of its own, from ``settings``)."""
    settings = settings or ApiSettings()
    decoder = decoder or JsonDecoder(settings.json_offload_bytes, settings.json_offload_processes)
    handlers = HttpRoutes(dataplane, settings, decoder)

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
            (prefix + "/infer", _wrong_method, ["GET", "PUT", "DELETE", "PATCH"]),
            (prefix + "/infer_stream", handlers.infer_stream, ["POST"]),
        ]
    app = Starlette(
        routes=[
            *model_control_routes(dataplane),  # before /v2/models/{name}
            *(Route(path, endpoint, methods=methods) for path, endpoint, methods in routes),
        ]
    )
    install_error_handlers(app)
    # outermost first: errors, who may call, then the infer fast path before the router
    asgi: ASGIApp = InferRoute(app, handlers)
    if settings.token:
        asgi = BearerAuth(asgi, token=settings.token, public_paths=settings.public_paths)
    if settings.allowed_hosts is not None:
        asgi = AllowedHosts(asgi, hosts=settings.allowed_hosts)
    return InternalErrors(asgi)


#: ``/v2/models/{name}[/versions/{version}]/infer``
INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


class InferRoute:
    """ASGI: ``POST .../infer`` goes straight to :meth:`HttpRoutes.infer`, everything else to
    the router (whose routing and Request/Response objects cost more than the rest of a
    batch-1 request's Python)."""

    def __init__(self, app: ASGIApp, handlers: HttpRoutes) -> None:
        self.app = app
        self.handlers = handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                await self.handlers.infer(match[1], match[2], scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _wrong_method(request: HttpRequest) -> Response:
    return error_response(405, f"{request.method} {request.url.path}: use POST")
