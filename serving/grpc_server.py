"""gRPC front end: Triton's ``inference.GRPCInferenceService`` (KServe v2) on the dataplane.

The service and its messages are Triton's own generated code (``tritonclient.grpc.service_pb2``,
``service_pb2_grpc``, ``model_config_pb2``), so ``tritonclient.grpc`` (sync, aio, streaming) talks
to this server as it talks to Triton. It runs on ``grpc.aio`` in the same event loop as the HTTP
front end, over the same dataplane (:class:`~serving.dataplane.FrontEndPlane`: lookup,
validation, dispatch, retry on swap, documents, metrics): a thin adapter like :mod:`serving.api`.

=========================  ==================================================================
``ServerLive/Ready``       as ``/v2/health/live|ready`` (answered without the token, like them)
``ServerMetadata``         name, version, extensions
``ModelReady``             ready while the version has a live engine; false for an unknown
                           model (Triton's answer)
``ModelMetadata``          name, versions, platform, inputs, outputs
``ModelConfig``            the model configuration document parsed as Triton's ``ModelConfig``
``ModelInfer``             typed ``contents`` or ``raw_input_contents`` in,
                           ``raw_output_contents`` out
``ModelStreamInfer``       bidirectional; each request is answered as soon as it is done, so
                           answers come by completion, not in request order: match them by
                           ``id`` (as with Triton); an error is a response with
                           ``error_message`` and the stream goes on
``RepositoryIndex``        every loaded version, state READY
``ModelStatistics``        Triton's statistics of each loaded version (the HTTP document)
``RepositoryModelLoad``    explicit model control, as the HTTP routes (the dataplane's methods)
``RepositoryModelUnload``
=========================  ==================================================================

Errors: a :class:`~serving.errors.ServingError` is answered with its ``grpc_code`` (400
INVALID_ARGUMENT, 404 NOT_FOUND, 413/429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE, ...) and the same
message as over HTTP, cut to :data:`MAX_DETAILS_BYTES` on the wire. The bearer token
(``token=``) is checked on ``authorization: Bearer <token>`` metadata (UNAUTHENTICATED
otherwise). ``serving.body_limit_bytes`` is the largest message received.
Shared-memory, trace and log-settings methods are not offered (UNIMPLEMENTED, as Triton answers
for a disabled feature).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from serving.auth import TOKEN_REFUSED, bearer_token_ok
from serving.dataplane import FrontEndPlane
from serving.errors import BadRequest, NotFound, PortUnavailable, ServingError
from serving.grpc_codec import (
    UndecodableRequest,
    decode_infer_request,
    encode_infer_response,
    parse_infer_request,
)
from serving.inference import InferRequest
from serving.tensor_spec import TensorSpec

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
#: methods answered without the bearer token (the liveness/readiness probes, as over HTTP)
PUBLIC_METHODS = frozenset({f"/{SERVICE}/ServerLive", f"/{SERVICE}/ServerReady"})
#: most requests of one stream taken and not yet sent back (running, or answered and waiting
#: for the client to read): past it the stream reads no more, so a client that sends without
#: reading is held back by flow control instead of piling answers up in the server's memory
STREAM_WINDOW = 64
#: wire bytes of a status message at most: grpc percent-encodes it into the ``grpc-message``
#: trailer (3 bytes per byte outside printable ASCII) and a client refuses trailers over its
#: metadata limit (8 KiB soft, 16 KiB hard by default) with a transport error, not the status
MAX_DETAILS_BYTES = 4096


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """The service's methods over one dataplane (see the module docstring)."""

    def __init__(self, dataplane: FrontEndPlane) -> None:
        self.dataplane = dataplane

    # ---- server

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerReadyResponse(ready=await self.dataplane.ready())

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return service_pb2.ServerMetadataResponse(**await self.dataplane.server_metadata())

    # ---- models

    async def ModelReady(self, request: Any, context: Any) -> Any:
        try:
            doc = await self.dataplane.model_ready(request.name, request.version or None)
        except NotFound:
            return service_pb2.ModelReadyResponse(ready=False)
        return service_pb2.ModelReadyResponse(ready=doc["ready"])

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        async def metadata() -> Any:
            return json_format.ParseDict(
                await self.dataplane.model_metadata(request.name, request.version or None),
                service_pb2.ModelMetadataResponse(),
            )

        return await _answer(context, metadata)

    async def ModelConfig(self, request: Any, context: Any) -> Any:
        async def config() -> Any:
            doc = await self.dataplane.model_config(request.name, request.version or None)
            message = json_format.ParseDict(
                doc, model_config_pb2.ModelConfig(), ignore_unknown_fields=True
            )
            return service_pb2.ModelConfigResponse(config=message)

        return await _answer(context, config)

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:
        response = service_pb2.RepositoryIndexResponse()
        for doc in await self.dataplane.repository_index(ready_only=request.ready):
            response.models.add(**doc)
        return response

    async def ModelStatistics(self, request: Any, context: Any) -> Any:
        async def statistics() -> Any:
            return json_format.ParseDict(
                await self.dataplane.model_statistics(
                    request.name or None, request.version or None
                ),
                service_pb2.ModelStatisticsResponse(),
                ignore_unknown_fields=True,
            )

        return await _answer(context, statistics)

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        async def load() -> Any:
            await self.dataplane.load_model(request.model_name, _parameters(request.parameters))
            return service_pb2.RepositoryModelLoadResponse()

        return await _answer(context, load)

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        async def unload() -> Any:
            await self.dataplane.unload_model(request.model_name, _parameters(request.parameters))
            return service_pb2.RepositoryModelUnloadResponse()

        return await _answer(context, unload)

    # ---- inference

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        try:
            return await self._infer(request)
        except ServingError as exc:
            await _abort(context, exc)

    async def _infer(self, request: Any) -> Any:
        """One inference, its metrics recorded; raises ServingError."""
        t0 = time.perf_counter()
        dataplane = self.dataplane
        name = request.model_name
        version = request.model_version or None
        try:
            if isinstance(request, UndecodableRequest):
                raise BadRequest(request.error)

            async def decode(specs: Mapping[str, TensorSpec] | None) -> InferRequest:
                return decode_infer_request(request, specs)

            ireq, result = await dataplane.infer_with(name, version, decode)
            response = encode_infer_response(
                result.model_name,
                str(result.model_version),
                result.outputs,
                result.output_names,
                ireq.id,
            )
        except ServingError as exc:
            dataplane.record_failure(name, exc.status)
            raise
        dataplane.record_success(result, time.perf_counter() - t0)
        return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        answers: asyncio.Queue[Any] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)
        pending: set[asyncio.Task[None]] = set()

        async def answer(request: Any) -> None:
            try:
                response = service_pb2.ModelStreamInferResponse(
                    infer_response=await self._infer(request)
                )
            except ServingError as exc:
                response = service_pb2.ModelStreamInferResponse(
                    error_message=exc.message,
                    infer_response=service_pb2.ModelInferResponse(
                        model_name=request.model_name,
                        model_version=request.model_version,
                        id=request.id,
                    ),
                )
            except Exception as exc:  # noqa: BLE001 - one bad request must not end the stream
                log.exception("ModelStreamInfer request failed")
                self.dataplane.record_failure(request.model_name, 500)
                response = service_pb2.ModelStreamInferResponse(
                    error_message=f"internal error: {type(exc).__name__}: {exc}",
                    infer_response=service_pb2.ModelInferResponse(id=request.id),
                )
            await answers.put(response)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.acquire()
                    task = asyncio.ensure_future(answer(request))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
            finally:
                await answers.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await answers.get()
                if item is None:  # the client closed its side: answer what is left, then end
                    while pending:
                        await asyncio.wait(set(pending))
                    while not answers.empty():
                        yield answers.get_nowait()
                    break
                yield item  # resumes once sent: only then may the reader take one more
                window.release()
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()
            for task in pending:
                task.cancel()


def _parameters(parameters: Any) -> dict[str, Any]:
    """A ``map<string, ModelRepositoryParameter>`` as the plain dict the dataplane takes."""
    out: dict[str, Any] = {}
    for key, value in parameters.items():
        kind = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, kind) if kind else None
    return out


async def _answer(context: Any, build: Callable[[], Awaitable[Any]]) -> Any:
    """``await build()``, or the gRPC status of the ServingError it raised."""
    try:
        return await build()
    except ServingError as exc:
        await _abort(context, exc)


async def _abort(context: Any, exc: ServingError) -> None:
    """End the call with ``exc``'s status and its message, cut to :data:`MAX_DETAILS_BYTES` on
    the wire (a message echoing a huge model name, or listing a big repository's models, made
    the client drop the trailers: a transport error instead of NOT_FOUND)."""
    await context.abort(grpc.StatusCode[exc.grpc_code], status_details(exc.message))


def status_details(message: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """``message`` whole when its percent-encoded form fits ``limit`` bytes, else its longest
    prefix that fits with `` ... (truncated)`` after it."""
    sizes = [1 if " " <= ch <= "~" and ch != "%" else 3 * len(ch.encode()) for ch in message]
    if sum(sizes) <= limit:
        return message
    suffix = " ... (truncated)"
    budget = limit - len(suffix)
    for i, size in enumerate(sizes):
        budget -= size
        if budget < 0:
            return message[:i] + suffix
    return message


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuse (UNAUTHENTICATED) a call without ``authorization: Bearer <token>`` metadata, except
    :data:`PUBLIC_METHODS`."""

    def __init__(self, token: str) -> None:
        self.token = token

        async def refuse_unary(request: Any, context: Any) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, TOKEN_REFUSED)

        async def refuse_stream(request_iterator: Any, context: Any) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, TOKEN_REFUSED)

        self._refuse_unary = grpc.unary_unary_rpc_method_handler(refuse_unary)
        self._refuse_stream = grpc.stream_stream_rpc_method_handler(refuse_stream)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method in PUBLIC_METHODS:
            return await continuation(details)
        given = None
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value
                break
        if bearer_token_ok(given, self.token):
            return await continuation(details)
        if details.method.endswith("/ModelStreamInfer"):
            return self._refuse_stream
        return self._refuse_unary


def _add_service(server: grpc.aio.Server, servicer: InferenceServicer) -> None:
    """Register Triton's generated method handlers, the inference methods' requests parsed by
    :func:`~serving.grpc_codec.parse_infer_request`: a message that does not parse is its
    request's INVALID_ARGUMENT (in a stream one error response, and the stream goes on) instead
    of grpc's UNKNOWN ending the call and, in a stream, every request after it."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}

    class Collect:  # what the generated code registers, to register it amended
        def add_generic_rpc_handlers(self, generic: Any) -> None:
            pass

        def add_registered_method_handlers(self, service: str, found: dict[str, Any]) -> None:
            handlers.update(found)

    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, Collect())
    for method in ("ModelInfer", "ModelStreamInfer"):
        handlers[method] = handlers[method]._replace(request_deserializer=parse_infer_request)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def grpc_server(
    dataplane: FrontEndPlane,
    host: str,
    port: int,
    *,
    token: str | None = None,
    max_message_bytes: int,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, int]:
    """A ``grpc.aio`` server for ``dataplane`` bound to ``host:port`` (0: a free port), not yet
    started; returns it and the bound port. Call it inside the event loop that will run it.
    ``reuse_port``: the front-end processes of one server share the port (SO_REUSEPORT); the
    engine process checks first that nothing else holds it
    (:func:`serving.frontend_processes.check_port_free`)."""
    server = grpc.aio.server(
        interceptors=[TokenInterceptor(token)] if token else None,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", int(reuse_port)),
        ],
    )
    _add_service(server, InferenceServicer(dataplane))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise PortUnavailable(
            f"cannot listen for gRPC on {address}: the port is in use or not allowed; pass "
            "serving.grpc_port=<a free port>, or serving.grpc_port=null for no gRPC"
        )
    return server, bound
