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

This module wires the routes; the error bodies live in :mod:`serving.api_errors`, the bearer
token in :mod:`serving.auth`, the body limit in :mod:`serving.request_body` and ``infer_stream``
in :mod:`serving.ndjson_stream`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request as HttpRequest
from starlette.responses import Response
from starlette.routing import Route

from serving.api_errors import JSON, error_response, install_error_handlers, json_response
from serving.auth import BearerAuth
from serving.batching import Request
from serving.datatypes import v2_to_triton
from serving.errors import PoolClosed, ServingError, Unavailable
from serving.metrics import CONTENT_TYPE, ServingMetrics
from serving.ndjson_stream import NDJSONStream
from serving.pool import EnginePool
from serving.protocol import HEADER_LENGTH, InferRequest, decode_request, encode_response
from serving.registry import ModelRegistry
from serving.request_body import read_body

SERVER_NAME = "fedserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "model_repository"]


@dataclass
class ApiSettings:
    body_limit_bytes: int = 64 * 1024 * 1024
    token: str | None = None
    #: paths answered without the bearer token (liveness/readiness probes)
    public_paths: tuple[str, ...] = ("/v2/health/live", "/v2/health/ready")


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
            body = await read_body(request, self.settings.body_limit_bytes)
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
            return error_response(exc.status, exc.message, exc.headers or None)
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
        return NDJSONStream(self, pool, request.path_params.get("version"))

    # ---- metadata

    async def server_metadata(self, request: HttpRequest) -> Response:
        return json_response(
            {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}
        )

    async def live(self, request: HttpRequest) -> Response:
        return json_response({"live": True})

    async def ready(self, request: HttpRequest) -> Response:
        ok = bool(self.is_ready())
        return json_response({"ready": ok}, status=200 if ok else 503)

    async def model_metadata(self, request: HttpRequest) -> Response:
        pool = self._pool(request)
        sig = pool.signature
        return json_response(
            {
                "name": pool.name,
                "versions": [str(v) for v in self.registry.versions(pool.name)],
                "platform": "onnxruntime_onnx",
                "inputs": [s.to_dict() for s in sig.inputs],
                "outputs": [s.to_dict() for s in sig.outputs],
            }
        )

    async def model_ready(self, request: HttpRequest) -> Response:
        pool = self._pool(request)
        ok = pool.ready
        return json_response(
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
        return json_response(config)

    async def repository_index(self, request: HttpRequest) -> Response:
        return json_response(
            [
                {"name": name, "version": str(v), "state": "READY"}
                for name, versions in self.registry.models().items()
                for v in versions
            ]
        )

    async def metrics_endpoint(self, request: HttpRequest) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)


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

    install_error_handlers(app)
    if settings.token:
        app.add_middleware(BearerAuth, token=settings.token, public_paths=settings.public_paths)
    return app
