"""``POST .../infer_stream``: NDJSON requests in, NDJSON results out, on one connection.

An adapter on the dataplane (:class:`~serving.dataplane.FrontEndPlane`) and the KServe v2 JSON
codec: each line is one v2 JSON request, looked up, validated and run like a single ``infer`` (a
line goes to the newest loaded version at the time it is read, unless the URL names a version).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from serving.dataplane import FrontEndPlane
from serving.errors import PayloadTooLarge, ServingError
from serving.inference import InferRequest
from serving.json_offload import JsonDecoder
from serving.protocol import encode_response
from serving.tensor_spec import TensorSpec

log = logging.getLogger(__name__)

#: most lines decoded and in flight at once; the reader waits when this many are pending
STREAM_WINDOW = 64


class NDJSONStream(Response):
    """Streams NDJSON results while still reading NDJSON requests from the same connection.

    Each line is decoded and dispatched as soon as it arrives (at most ``STREAM_WINDOW`` in flight);
    results are written in request order, each as soon as it and all earlier ones are done. A bad
    line yields ``{"error": ..., "status": code, "line": i}`` and the stream goes on.
    (Starlette's StreamingResponse would consume ``receive`` itself to watch for disconnects, so
    this response drives both directions.)
    """

    media_type = "application/x-ndjson"

    def __init__(
        self,
        dataplane: FrontEndPlane,
        name: str,
        version: str | None,
        body_limit_bytes: int,
        decoder: JsonDecoder,
    ) -> None:
        super().__init__(content=None, media_type=self.media_type)
        self.dataplane = dataplane
        self.name = name
        self.version = version
        self.limit = body_limit_bytes
        self.decoder = decoder

    async def _one(self, line: bytes, index: int) -> bytes:
        dataplane = self.dataplane
        try:
            if len(line) > self.limit:
                raise PayloadTooLarge(
                    f"line {index} is {len(line)} bytes, over the limit of "
                    f"{self.limit} bytes (serving.body_limit_bytes)"
                )
            t0 = time.perf_counter()

            async def decode(specs: Mapping[str, TensorSpec] | None) -> InferRequest:
                request = await self.decoder.decode(line, None, specs)
                request.outputs = [(name, False) for name, _ in request.outputs or []] or None
                request.binary_output = False  # NDJSON answers are JSON lines
                return request

            ireq, result = await dataplane.infer_with(self.name, self.version, decode)
            payload, _ = encode_response(
                result.model_name,
                str(result.model_version),
                result.outputs,
                result.output_names,
                ireq,
            )
            dataplane.record_success(result, time.perf_counter() - t0)
            return payload + b"\n"
        except ServingError as exc:
            dataplane.record_failure(self.name, exc.status)
            doc = {"error": exc.message, "status": exc.status, "line": index}
        except Exception as exc:  # noqa: BLE001 - one bad line must not end the stream
            log.exception("infer_stream line %d failed", index)
            dataplane.record_failure(self.name, 500)
            doc = {"error": f"internal error: {type(exc).__name__}: {exc}", "status": 500}
            doc["line"] = index
        return json.dumps(doc).encode() + b"\n"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        queue: asyncio.Queue[asyncio.Task[bytes] | None] = asyncio.Queue(STREAM_WINDOW)
        limit = self.limit

        async def reader() -> None:
            lines = LineSplitter(limit)
            index = 0
            try:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    more = message.get("more_body", False)
                    for line in lines.feed(message.get("body", b""), final=not more):
                        if line.strip():
                            await queue.put(asyncio.ensure_future(self._one(line, index)))
                            index += 1
                    if lines.overflow is not None:  # a line over the limit: answer it, stop
                        await queue.put(asyncio.ensure_future(self._one(lines.overflow, index)))
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


class LineSplitter:
    """Splits a byte stream into lines in time linear in its length: each chunk is scanned once,
    and a line that spans chunks is joined once, when its end arrives (appending to one growing
    ``bytes`` and splitting it again per chunk would copy and rescan it every time: quadratic).

    A partial line longer than ``limit`` stops the splitting: :attr:`overflow` then holds what
    arrived of it (over ``limit`` bytes, answered 413) and the caller stops reading.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self.overflow: bytes | None = None

    def feed(self, chunk: bytes, *, final: bool = False) -> list[bytes]:
        """The lines completed by ``chunk`` (and, when ``final``, the unterminated last one)."""
        lines: list[bytes] = []
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if self._parts:
                lines.append(b"".join([*self._parts, chunk[start:end]]))
                self._parts, self._size = [], 0
            else:
                lines.append(chunk[start:end])
            start = end + 1
        if start < len(chunk):
            self._parts.append(chunk[start:])
            self._size += len(chunk) - start
        if self._size > self.limit:
            self.overflow = b"".join(self._parts)
            self._parts, self._size = [], 0
        elif final and self._parts:
            lines.append(b"".join(self._parts))
            self._parts, self._size = [], 0
        return lines
