"""The link from a front-end process to the engine process's dataplane (``serving.frontends``).

With ``serving.frontends: N > 1`` the engine process (the engines, the scheduler, the one
:class:`~serving.dataplane.DataPlane`) starts N - 1 front-end processes
(:mod:`serving.frontend_worker`) that run the same HTTP and gRPC front ends on the same ports.
Their dataplane is a :class:`RemoteDataPlane`: each call goes over a Unix socket to
:class:`LinkServer` in the engine process, which makes it on the real dataplane. So every
version keeps one engine pool and one least-loaded dispatcher for all processes, and there is
one memory budget, one model control, one set of statistics and metrics. What a front-end
process takes off the engine process is the wire: HTTP parsing, gRPC's transport and protobuf,
decoding requests into tensors and encoding answers.

An inference is one round trip: the front-end process decodes the request without the model's
specs (they only make error messages name what the model expects) and sends the tensors; the
engine process validates them against the version that runs them. A request that does not
decode asks for the specs and is decoded again, so its message is the engine process's own.

Wire: frames of an 8-byte little-endian length and a pickle (protocol 5, numpy arrays copied
once). A call is ``(call_id, method, args)`` (``call_id`` 0: no answer wanted, for the request
metrics); an answer is ``(call_id, OK, value)``, ``(call_id, SERVING_ERROR, (class name,
message, headers))`` rebuilt as the same :class:`~serving.errors.ServingError` subclass, or
``(call_id, FAILED, text)`` for anything else. Only methods in :data:`LINK_METHODS` are called.
Pickles are only read from the processes the engine process started: the socket is in a
directory of its own that only this user can enter.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import struct
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from serving.dataplane import DataPlane, Decoder
from serving.errors import BadRequest, ServingError, Unavailable
from serving.inference import InferRequest, InferResult
from serving.tensor_spec import TensorSpec

log = logging.getLogger(__name__)

HEADER = struct.Struct("<Q")
OK, SERVING_ERROR, FAILED = 0, 1, 2
#: the dataplane methods a front-end process may call (all of FrontEndPlane's but
#: ``infer_with``, which it composes itself) plus ``hello`` (the config its front ends serve)
#: and ``listening`` (its front ends listen)
LINK_METHODS = frozenset(
    {
        "hello",
        "listening",
        "server_metadata",
        "ready",
        "not_ready_reason",
        "repository_index",
        "load_model",
        "unload_model",
        "model_statistics",
        "model_metadata",
        "model_ready",
        "model_config",
        "metrics_text",
        "input_specs",
        "infer_request",
        "record_success",
        "record_failure",
    }
)


class _Frames(asyncio.Protocol):
    """Splits a stream into frames (``on_frame`` gets each unpickled message) and writes the
    frames sent during one turn of the event loop with one system call: answers of a batch
    complete together, and a write per frame cost more than the rest of the hop."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()
        self._out: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer, start)
            end = start + HEADER.size + size
            if len(buffer) < end:
                break
            self.on_frame(pickle.loads(buffer[start + HEADER.size : end]))
            start = end
        if start:
            del buffer[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)

    def send(self, message: Any) -> None:
        body = pickle.dumps(message, protocol=5)
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out += (HEADER.pack(len(body)), body)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(out)

    def on_frame(self, message: Any) -> None:
        raise NotImplementedError


def _pack_tensor(array: np.ndarray) -> tuple[Any, ...]:
    if array.dtype.hasobject:  # BYTES tensors: Python objects, pickled as they are
        return (array,)
    return (array.dtype.str, array.shape, array.tobytes())


def _unpack_tensor(packed: tuple[Any, ...]) -> np.ndarray:
    if len(packed) == 1:
        return packed[0]
    dtype, shape, data = packed
    return np.frombuffer(data, dtype).reshape(shape)


# plain tuples of names, numbers and bytes on the wire: pickling the dataclasses and arrays
# themselves cost ~4x as much (copyreg's reduce of slotted dataclasses, numpy's own reduce)


def pack_request(request: InferRequest) -> tuple[Any, ...]:
    tensors = tuple((name, _pack_tensor(a)) for name, a in request.inputs.items())
    return (tensors, request.id, request.outputs, request.binary_output)


def unpack_request(packed: tuple[Any, ...]) -> InferRequest:
    tensors, request_id, outputs, binary_output = packed
    inputs = {name: _unpack_tensor(t) for name, t in tensors}
    return InferRequest(inputs, request_id, outputs, binary_output)


def pack_result(result: InferResult) -> tuple[Any, ...]:
    """Only the outputs to answer travel."""
    tensors = tuple((name, _pack_tensor(result.outputs[name])) for name in result.output_names)
    return (result.model_name, result.model_version, result.id, tensors, result.queue_seconds)


def unpack_result(packed: tuple[Any, ...]) -> InferResult:
    name, version, result_id, tensors, queue_seconds = packed
    outputs = {output: _unpack_tensor(t) for output, t in tensors}
    return InferResult(name, version, result_id, outputs, list(outputs), queue_seconds)


# ---------------------------------------------------------------- the engine process's side


class LinkServer:
    """Serves ``dataplane`` to front-end processes on a Unix socket at ``path``. ``hello``
    answers ``config`` (the engine process's ServeConfig with the ports its front ends bound);
    ``listening(pid)`` adds the process to :attr:`listening` (:meth:`wait_listening`) until its
    link closes."""

    def __init__(self, dataplane: DataPlane, path: str, config: Any) -> None:
        self.dataplane = dataplane
        self.path = path
        self.config = config
        self.listening: set[int] = set()
        self._changed = asyncio.Event()
        self._server: asyncio.AbstractServer | None = None
        #: the front-end processes' open links (closed by :meth:`close`)
        self.connections: set[_LinkConnection] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _LinkConnection(self), self.path)
        os.chmod(self.path, 0o600)

    def listening_changed(self) -> None:
        self._changed.set()

    async def wait_listening(self, pids: Callable[[], set[int]]) -> None:
        """Until every process in ``pids()`` listens."""
        while not pids() <= self.listening:
            self._changed.clear()
            await self._changed.wait()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for connection in list(self.connections):
                if connection.transport is not None:
                    connection.transport.close()
            await self._server.wait_closed()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class _LinkConnection(_Frames):
    def __init__(self, server: LinkServer) -> None:
        super().__init__()
        self.server = server
        self.pid: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.server.connections.discard(self)
        if self.pid is not None:
            self.server.listening.discard(self.pid)
            self.server.listening_changed()

    def on_frame(self, message: Any) -> None:
        call_id, method, args = message
        if method not in LINK_METHODS:
            self._answer(call_id, FAILED, f"no such link method {method!r}")
            return
        if method == "hello":
            self._answer(call_id, OK, self.server.config)
            return
        if method == "listening":
            self.pid = args[0]
            self.server.listening.add(self.pid)
            self.server.listening_changed()
            self._answer(call_id, OK, None)
            return
        if method in ("record_success", "record_failure"):  # the request metrics: no answer
            try:
                if method == "record_success":
                    name, version, queue_seconds, latency_s = args
                    result = InferResult(name, version, None, {}, [], queue_seconds)
                    self.server.dataplane.record_success(result, latency_s)
                else:
                    self.server.dataplane.record_failure(*args)
            except Exception:  # noqa: BLE001 - a metric must not end the link
                log.exception("link call %s failed", method)
            return
        asyncio.ensure_future(self._call(call_id, method, args))

    async def _call(self, call_id: int, method: str, args: tuple[Any, ...]) -> None:
        try:
            if method == "infer_request":
                name, version, packed = args
                request = unpack_request(packed)
                value = pack_result(
                    await self.server.dataplane.infer_request(name, version, request)
                )
            else:
                value = await getattr(self.server.dataplane, method)(*args)
        except ServingError as exc:
            self._answer(call_id, SERVING_ERROR, (type(exc).__name__, exc.message, exc.headers))
        except Exception as exc:  # noqa: BLE001 - the front end answers it as its 500
            log.exception("link call %s failed", method)
            self._answer(call_id, FAILED, f"{type(exc).__name__}: {exc}")
        else:
            self._answer(call_id, OK, value)

    def _answer(self, call_id: int, status: int, value: Any) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            self.send((call_id, status, value))
        except Exception as exc:  # noqa: BLE001 - an answer that cannot be sent is a 500, not a hang
            log.exception("link answer to call %d could not be sent", call_id)
            self.send((call_id, FAILED, f"the answer could not be sent: {type(exc).__name__}"))


# ---------------------------------------------------------------- the front-end process's side


class LinkError(RuntimeError):
    """A call the engine process failed with something other than a ServingError (a bug
    there): the front end answers it as its internal error."""


def _serving_errors() -> dict[str, type[ServingError]]:
    found: dict[str, type[ServingError]] = {}
    todo: list[type[ServingError]] = [ServingError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def rebuild_error(name: str, message: str, headers: Mapping[str, str]) -> ServingError:
    """The ServingError the engine process raised, as the same class with the same message and
    headers (its subclasses' own constructors take other arguments, so ServingError's)."""
    cls = _serving_errors().get(name, ServingError)
    error = cls.__new__(cls)
    ServingError.__init__(error, message, headers=headers)
    return error


class _LinkClient(_Frames):
    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[int, asyncio.Future[Any]] = {}

    def on_frame(self, message: Any) -> None:
        call_id, status, value = message
        future = self.pending.pop(call_id, None)
        if future is None or future.done():
            return
        if status == OK:
            future.set_result(value)
        elif status == SERVING_ERROR:
            future.set_exception(rebuild_error(*value))
        else:
            future.set_exception(LinkError(value))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        for future in self.pending.values():
            if not future.done():
                future.set_exception(Unavailable("the engine process is gone; retry"))
        self.pending.clear()


class RemoteDataPlane:
    """The dataplane of a front-end process: every call made in the engine process over the link
    at ``path`` (see the module). Connects on its first call, or on :meth:`connect`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._link: _LinkClient | None = None
        self._ids = itertools.count(1)

    async def connect(self) -> None:
        if self._link is None:
            loop = asyncio.get_running_loop()
            _, self._link = await loop.create_unix_connection(_LinkClient, self.path)

    async def closed(self) -> None:
        """Returns when the link is gone (the engine process stopped or died)."""
        await self.connect()
        assert self._link is not None
        await asyncio.shield(self._link.closed)

    def close(self) -> None:
        if self._link is not None and self._link.transport is not None:
            self._link.transport.close()

    async def _call(self, method: str, *args: Any) -> Any:
        if self._link is None:
            await self.connect()
        link = self._link
        assert link is not None
        if link.closed.done():
            raise Unavailable("the engine process is gone; retry")
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        link.send((call_id, method, args))  # raises before anything waits if it cannot pickle
        link.pending[call_id] = future
        return await future

    def _notify(self, method: str, *args: Any) -> None:
        link = self._link
        if link is not None and not link.closed.done():
            link.send((0, method, args))

    async def hello(self) -> Any:
        """The config this process's front ends serve (the engine process's, ports bound)."""
        return await self._call("hello")

    async def listening(self, pid: int) -> None:
        """Tells the engine process that this process's front ends listen."""
        await self._call("listening", pid)

    # ---- the FrontEndPlane calls, made in the engine process

    async def server_metadata(self) -> dict[str, Any]:
        return await self._call("server_metadata")

    async def ready(self) -> bool:
        return await self._call("ready")

    async def not_ready_reason(self) -> str | None:
        return await self._call("not_ready_reason")

    async def repository_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        return await self._call("repository_index", ready_only)

    async def load_model(self, name: str, parameters: Mapping[str, Any] | None = None) -> None:
        await self._call("load_model", name, dict(parameters or {}))

    async def unload_model(self, name: str, parameters: Mapping[str, Any] | None = None) -> None:
        await self._call("unload_model", name, dict(parameters or {}))

    async def model_statistics(
        self, name: str | None = None, version: str | None = None
    ) -> dict[str, Any]:
        return await self._call("model_statistics", name, version)

    async def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        return await self._call("model_metadata", name, version)

    async def model_ready(self, name: str, version: str | None = None) -> dict[str, Any]:
        return await self._call("model_ready", name, version)

    async def model_config(self, name: str, version: str | None = None) -> dict[str, Any]:
        return await self._call("model_config", name, version)

    async def metrics_text(self) -> bytes:
        return await self._call("metrics_text")

    async def input_specs(
        self, name: str, version: str | int | None = None
    ) -> Mapping[str, TensorSpec]:
        return await self._call("input_specs", name, version)

    async def infer_with(
        self, name: str, version: str | int | None, decode: Decoder
    ) -> tuple[InferRequest, InferResult]:
        """Decode here without the specs, run in the engine process. A request that does not
        decode is answered as the engine process would: NotFound/Unavailable before a bad body,
        and a bad body's message naming the model's spec (decoded again with it)."""
        try:
            request = await decode(None)
        except ServingError as first:
            specs = await self.input_specs(name, version)
            if not isinstance(first, BadRequest):
                raise
            request = await decode(specs)
        packed = await self._call("infer_request", name, version, pack_request(request))
        return request, unpack_result(packed)

    def record_success(self, result: InferResult, latency_s: float) -> None:
        self._notify(
            "record_success",
            result.model_name,
            result.model_version,
            result.queue_seconds,
            latency_s,
        )

    def record_failure(self, name: str, status: int) -> None:
        self._notify("record_failure", name, status)
