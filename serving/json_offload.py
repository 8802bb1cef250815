"""Decoding big JSON request bodies in a helper process, so one big body stalls nobody else.

CPython's JSON parser and numpy's list conversion hold the GIL from start to end (a 44 MB body: a
0.5 s gap in every other thread of the process), so a thread would not help: a body whose JSON part
is over ``serving.json_offload_bytes`` is decoded by :func:`serving.protocol.decode_request` in a
helper process (spawned on the first such body; ``serving.json_offload_processes`` of them) and
the event loop awaits the result. The bytes travel by pipe (a memcpy each way, ~10 ms for 60 MB);
the decoded tensors come back as numpy arrays. Smaller bodies, and the JSON header of a binary
request, are decoded in the loop: for them a process hop would cost more than it saves.

A helper that dies (e.g. killed for memory) is replaced; the request it was decoding is answered
503, never 500.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
from collections.abc import Mapping
from concurrent.futures.process import BrokenProcessPool

from serving.errors import Unavailable
from serving.inference import InferRequest
from serving.protocol import decode_request
from serving.tensor_spec import TensorSpec

log = logging.getLogger(__name__)


class JsonDecoder:
    """``await decoder.decode(body, header_length, specs)``: :func:`decode_request`, in a helper
    process when the body's JSON part is over ``offload_bytes`` (None: never)."""

    def __init__(self, offload_bytes: int | None, processes: int = 1) -> None:
        self.offload_bytes = offload_bytes
        self.processes = max(1, int(processes))
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None

    def json_length(self, body: bytes, header_length: int | str | None) -> int:
        """Bytes of ``body`` that are JSON (all of it, or the header before the binary part)."""
        if header_length is None:
            return len(body)
        try:
            return min(len(body), max(0, int(header_length)))
        except ValueError:
            return 0  # decode_request answers the bad header

    async def decode(
        self,
        body: bytes,
        header_length: int | str | None,
        specs: Mapping[str, TensorSpec] | None,
    ) -> InferRequest:
        limit = self.offload_bytes
        if limit is None or self.json_length(body, header_length) <= limit:
            return decode_request(body, header_length, specs)
        executor = self._pool()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                executor, decode_request, body, header_length, dict(specs or {})
            )
        except BrokenProcessPool:
            log.error("the JSON decoding process died; starting a new one")
            if self._executor is executor:
                self._executor = None
            executor.shutdown(wait=False, cancel_futures=True)
            raise Unavailable("the JSON decoder of big request bodies restarted; retry") from None

    def _pool(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._executor is None:
            # spawn: the server has threads (engines, watcher), so fork would copy held locks
            self._executor = concurrent.futures.ProcessPoolExecutor(
                self.processes, mp_context=multiprocessing.get_context("spawn")
            )
        return self._executor

    def close(self) -> None:
        """Stop the helper processes (pending decodes are cancelled)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
