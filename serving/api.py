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
``POST /v2/repository/index``  loaded models (Triton's repository extension, read-only)
``GET /metrics``               Prometheus text format
=============================  =====================================================================

Errors: every non-200 body is ``{"error": "..."}`` (tritonclient parses only that): 400 bad input
(the message names the input and the model's spec), 401 missing/wrong bearer token, 404 unknown
model/version/route, 413 body over ``body_limit_bytes``, 429 queues full (``Retry-After``), 503 no
live engine (``Retry-After``). FastAPI's own handlers (``{"detail": ...}``, 422) are replaced.

Hot path: the infer routes are plain Starlette routes (no pydantic, no dependency solving), the body
is decoded straight into numpy, and the request is awaited as an asyncio future resolved by the
engine's thread; only models whose measured run time is under ``serving.inline_max_ms`` run inline
in the event loop (see :mod:`serving.dispatcher`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.batching import Request
from serving.dispatcher import PoolClosed
from serving.metrics import CONTENT_TYPE, ServingMetrics
from serving.model_config import v2_to_triton
from serving.pool import EnginePool
from serving.protocol import (
    HEADER_LENGTH,
    BadRequest,
    InferRequest,
    PayloadTooLarge,
    ServingError,
    Unavailable,
    decode_request,
    encode_response,
    error_body,
)
from serving.registry import ModelRegistry

log = logging.getLogger(__name__)

SERVER_NAME = "fedserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "model_repository"]
JSON = "application/json"
STREAM_WINDOW = 64


@dataclass
class ApiSettings:
    body_limit_bytes: int = 64 * 1024 * 1024
    token: str | None = None
    #: paths answered without the bearer token (liveness/readiness probes)
    public_paths: tuple[str, ...] = ("/v2/health/live", "/v2/health/ready")


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(doc).encode(), status_code=status, media_type=JSON, headers=headers)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message), status_code=status, media_type=JSON, headers=headers)


class _BearerAuth:
    """Pure ASGI middleware: ``Authorization: Bearer <token>`` on every non-public path."""

    def __init__(self, app: ASGIApp, token: str, public_paths: tuple[str, ...]) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.public = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.public:
            given = b""
            for key, value in scope["headers"]:
                if key == b"authorization":
                    given = value
                    break
            if not hmac.compare_digest(given, self.expected):
                response = _error(
                    401,
                    "missing or invalid bearer token (send 'Authorization: Bearer <token>')",
                    {"WWW-Authenticate": "Bearer"},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _read_body(request: HttpRequest, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            size = int(length)
        except ValueError:
            raise BadRequest(f"Content-Length must be an integer, got {length!r}") from None
        if size > limit:
            raise PayloadTooLarge(
                f"request body of {size} bytes exceeds the limit of {limit} bytes "
                "(serving.body_limit_bytes)"
            )
    chunks = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise PayloadTooLarge(
                f"request body exceeds the limit of {limit} bytes (serving.body_limit_bytes)"
            )
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding")
    if encoding:
        body = _decompress(body, encoding.lower(), limit)
    return body


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding not in ("gzip", "deflate"):
        raise BadRequest(f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    d = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BadRequest(f"request body is not valid {encoding}: {exc}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise PayloadTooLarge(
            f"decompressed request body exceeds the limit of {limit} bytes "
            "(serving.body_limit_bytes)"
        )
    return out


class ServingApp:
    """Route handlers bound to a registry, metrics and settings (see :func:`create_app`)."""

    def __init__(
        self,
        registry: ModelRegistry,
        settings: ApiSettings,
        metrics: ServingMetrics,
        ready: Callable[[], bool],
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.is_ready = ready

    # ---- helpers

    def _pool(self, request: HttpRequest) -> EnginePool:
        params = request.path_params
        return self.registry.get(params["name"], params.get("version"))

    async def _run(
        self, pool: EnginePool, ireq: InferRequest, n: int, version: str | None
    ) -> tuple[EnginePool, Request]:
        """Await the request, looking the model up again if its pool closed for a swap."""
        for _ in range(3):
            try:
                done = await pool.infer_async(ireq.inputs, n)
            except PoolClosed:
                fresh = self.registry.get(pool.name, version)
                if fresh is pool:
                    raise
                if fresh.signature != pool.signature:
                    n = fresh.signature.validate(ireq.inputs)
                pool = fresh
                continue
            if done.error is not None:
                raise done.error
            return pool, done
        raise Unavailable(f"model '{pool.name}' is being swapped; retry")

    def _label(self, request: HttpRequest) -> str:
        name = request.path_params.get("name", "")
        return name if name in self.registry.models() else "_unknown"

    # ---- inference

    async def infer(self, request: HttpRequest) -> Response:
        t0 = time.perf_counter()
        try:
            pool = self._pool(request)
            body = await _read_body(request, self.settings.body_limit_bytes)
            ireq = decode_request(
                body, request.headers.get(HEADER_LENGTH), pool.signature.input_map
            )
            n = pool.signature.validate(ireq.inputs)
            pool, done = await self._run(pool, ireq, n, request.path_params.get("version"))
            assert done.outputs is not None
            payload, header_len = encode_response(
                pool.name, str(pool.version), done.outputs, pool.signature.output_names, ireq
            )
        except ServingError as exc:
            self.metrics.failure(self._label(request), exc.status)
            return _error(exc.status, exc.message, exc.headers or None)
        self.metrics.observe(pool.name, pool.version, time.perf_counter() - t0, done.queue_seconds)
        if header_len is None:
            return Response(payload, media_type=JSON)
        return Response(
            payload,
            media_type="application/octet-stream",
            headers={HEADER_LENGTH: str(header_len)},
        )

    async def infer_stream(self, request: HttpRequest) -> Response:
        pool = self._pool(request)  # 404 before the stream starts
        return _NDJSONStream(self, pool, request.path_params.get("version"))

    # ---- metadata

    async def server_metadata(self, request: HttpRequest) -> Response:
        return _json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS})

    async def live(self, request: HttpRequest) -> Response:
        return _json({"live": True})

    async def ready(self, request: HttpRequest) -> Response:
        ok = bool(self.is_ready())
        return _json({"ready": ok}, status=200 if ok else 503)

    async def model_metadata(self, request: HttpRequest) -> Response:
        pool = self._pool(request)
        sig = pool.signature
        return _json(
            {
                "name": pool.name,
                "versions": [str(v) for v in self.registry.versions(pool.name)],
                "platform": "onnxruntime_onnx",
                "inputs": [s.as_dict() for s in sig.inputs],
                "outputs": [s.as_dict() for s in sig.outputs],
            }
        )

    async def model_ready(self, request: HttpRequest) -> Response:
        pool = self._pool(request)
        ok = pool.ready
        return _json(
            {"name": pool.name, "version": str(pool.version), "ready": ok},
            status=200 if ok else 503,
        )

    async def model_config(self, request: HttpRequest) -> Response:
        pool = self._pool(request)
        sig = pool.signature
        batching = sig.max_batch_size > 0

        def tensors(specs: Any) -> list[dict[str, Any]]:
            return [
                {
                    "name": s.name,
                    "data_type": v2_to_triton(s.datatype),
                    "dims": list(s.shape[1:] if batching else s.shape),
                }
                for s in specs
            ]

        gpu = pool.obtained_providers[:1] == ["CUDAExecutionProvider"]
        config: dict[str, Any] = {
            "name": pool.name,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "version": str(pool.version),
            "max_batch_size": sig.max_batch_size,
            "input": tensors(sig.inputs),
            "output": tensors(sig.outputs),
            "instance_group": [
                {
                    "name": pool.name,
                    "kind": "KIND_GPU" if gpu else "KIND_CPU",
                    "count": len(pool.workers),
                }
            ],
            "parameters": {
                "providers": {"string_value": ",".join(pool.obtained_providers)},
                "policy": {"string_value": pool.settings.policy},
            },
        }
        if batching:
            config["dynamic_batching"] = {
                "max_queue_delay_microseconds": int(pool.settings.max_queue_delay_ms * 1000),
                "max_batch_size": pool.batch_limit,
            }
        return _json(config)

    async def repository_index(self, request: HttpRequest) -> Response:
        return _json(
            [
                {"name": name, "version": str(v), "state": "READY"}
                for name, versions in self.registry.models().items()
                for v in versions
            ]
        )

    async def metrics_endpoint(self, request: HttpRequest) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)


class _NDJSONStream(Response):
    """Streams NDJSON results while still reading NDJSON requests from the same connection.

    Each line is decoded and dispatched as soon as it arrives (at most ``STREAM_WINDOW`` in flight);
    results are written in request order, each as soon as it and all earlier ones are done. A bad
    line yields ``{"error": ..., "status": code, "line": i}`` and the stream goes on.
    (Starlette's StreamingResponse would consume ``receive`` itself to watch for disconnects, so
    this response drives both directions.)
    """

    media_type = "application/x-ndjson"

    def __init__(self, app: ServingApp, pool: EnginePool, version: str | None) -> None:
        super().__init__(content=None, media_type=self.media_type)
        self.app = app
        self.pool = pool
        self.version = version

    async def _one(self, line: bytes, index: int) -> bytes:
        app = self.app
        pool = self.pool
        try:
            if len(line) > app.settings.body_limit_bytes:
                raise PayloadTooLarge(
                    f"line {index} is {len(line)} bytes, over the limit of "
                    f"{app.settings.body_limit_bytes} bytes (serving.body_limit_bytes)"
                )
            t0 = time.perf_counter()
            ireq = decode_request(line, None, pool.signature.input_map)
            ireq.outputs = [(name, False) for name, _ in ireq.outputs or []] or None
            ireq.binary_output = False
            n = pool.signature.validate(ireq.inputs)
            pool, done = await app._run(pool, ireq, n, self.version)
            self.pool = pool
            assert done.outputs is not None
            payload, _ = encode_response(
                pool.name, str(pool.version), done.outputs, pool.signature.output_names, ireq
            )
            app.metrics.observe(
                pool.name, pool.version, time.perf_counter() - t0, done.queue_seconds
            )
            return payload + b"\n"
        except ServingError as exc:
            app.metrics.failure(pool.name, exc.status)
            doc = {"error": exc.message, "status": exc.status, "line": index}
        except Exception as exc:  # noqa: BLE001 - one bad line must not end the stream
            log.exception("infer_stream line %d failed", index)
            app.metrics.failure(pool.name, 500)
            doc = {"error": f"internal error: {type(exc).__name__}: {exc}", "status": 500}
            doc["line"] = index
        return json.dumps(doc).encode() + b"\n"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        queue: asyncio.Queue[asyncio.Task[bytes] | None] = asyncio.Queue(STREAM_WINDOW)
        limit = self.app.settings.body_limit_bytes

        async def reader() -> None:
            buffer = b""
            index = 0
            try:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    buffer += message.get("body", b"")
                    more = message.get("more_body", False)
                    *lines, buffer = buffer.split(b"\n")
                    if not more and buffer:
                        lines.append(buffer)
                        buffer = b""
                    for line in lines:
                        if line.strip():
                            await queue.put(asyncio.ensure_future(self._one(line, index)))
                            index += 1
                    if len(buffer) > limit:
                        await queue.put(asyncio.ensure_future(self._one(buffer, index)))
                        return
                    if not more:
                        return
            finally:
                await queue.put(None)

        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", self.media_type.encode())],
            }
        )
        task = asyncio.ensure_future(reader())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                line = await item
                await send({"type": "http.response.body", "body": line, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            task.cancel()


def create_app(
    registry: ModelRegistry,
    *,
    settings: ApiSettings | None = None,
    metrics: ServingMetrics | None = None,
    ready: Callable[[], bool] | None = None,
) -> FastAPI:
    """The ASGI app serving ``registry``. ``ready`` tells readiness (e.g. the watcher's first load
    is done); metrics default to a fresh :class:`ServingMetrics` (own CollectorRegistry)."""
    settings = settings or ApiSettings()
    metrics = metrics or ServingMetrics(registry)
    handlers = ServingApp(registry, settings, metrics, ready or (lambda: True))
    app = FastAPI(
        title="fedserve", docs_url=None, redoc_url=None, openapi_url=None, version=SERVER_VERSION
    )
    app.state.serving = handlers
    app.state.registry = registry
    app.state.metrics = metrics

    routes: list[tuple[str, Callable[..., Any], list[str]]] = [
        ("/v2", handlers.server_metadata, ["GET"]),
        ("/v2/health/live", handlers.live, ["GET"]),
        ("/v2/health/ready", handlers.ready, ["GET"]),
        ("/v2/repository/index", handlers.repository_index, ["POST"]),
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
    for path, endpoint, methods in routes:
        app.router.routes.append(Route(path, endpoint, methods=methods))

    @app.exception_handler(ServingError)
    async def _serving_error(request: HttpRequest, exc: ServingError) -> Response:
        return _error(exc.status, exc.message, exc.headers or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HttpRequest, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: HttpRequest, exc: RequestValidationError) -> Response:
        parts = [
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        ]
        return _error(400, "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def _internal_error(request: HttpRequest, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, f"internal server error: {type(exc).__name__}: {exc}")

    if settings.token:
        app.add_middleware(_BearerAuth, token=settings.token, public_paths=settings.public_paths)
    return app
