"""Per-version inference statistics, cumulative since the server started, in Triton's shape.

One :class:`ModelStatistics` per model version the server knows; the scheduler keeps it across
evictions and reloads, so its counts only grow. Who records what:

* every request that reached an engine, when it completes (:meth:`Request.finish
  <serving.batching.Request.finish>`): ``success`` or ``fail`` (count, and nanoseconds from
  dispatch to completion) and ``last_inference``;
* every executed batch (:class:`~serving.worker.Worker`): ``execution_count``,
  ``inference_count`` (rows), ``queue`` (each request's wait) and ``compute_input`` (concatenating
  the batch), ``compute_infer`` (the run), ``compute_output`` (splitting the outputs), counted per
  request with the batch's duration as Triton does, and per batch size in ``batch_stats``;
* the memory the version's engines hold, measured when it loaded (``memory_usage``).

:meth:`ModelStatistics.to_triton` is one ``$model_stat`` object of Triton's statistics extension
(``GET v2/models[/m[/versions/v]]/stats``; field names as Triton's HTTP JSON and its gRPC
``ModelStatistics`` message), so ``tritonclient``'s ``get_inference_statistics`` reads it; no
response cache exists here, so ``cache_hit``/``cache_miss`` stay 0. Recording takes one lock per
request and one per batch.
"""

from __future__ import annotations

import threading
import time
from typing import Any

#: duration stats of Triton's ``inference_stats``, in its order
INFERENCE_STATS = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)
#: duration stats of one ``batch_stats`` entry
BATCH_STATS = ("compute_input", "compute_infer", "compute_output")


class ModelStatistics:
    """Triton's statistics of one model version (see the module docstring)."""

    def __init__(self, name: str, version: int) -> None:
        self.name = name
        self.version = int(version)
        self._lock = threading.Lock()
        #: stat -> [count, ns]
        self._inference = {key: [0, 0] for key in INFERENCE_STATS}
        #: batch size -> stat -> [executions, ns]
        self._batches: dict[int, dict[str, list[int]]] = {}
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        #: (type, device id) -> bytes, e.g. ("CPU", 0)
        self._memory: dict[tuple[str, int], int] = {}

    # ---- recording

    def record_request(self, ok: bool, ns: int) -> None:
        """One request completed (``ok``) or failed after dispatch, ``ns`` after dispatch."""
        key = "success" if ok else "fail"
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            stat = self._inference[key]
            stat[0] += 1
            stat[1] += ns
            self.last_inference_ms = now_ms

    def record_execution(
        self,
        requests: int,
        rows: int,
        queue_ns: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
    ) -> None:
        """One batch of ``requests`` requests (``rows`` rows) ran: ``queue_ns`` is the sum of the
        requests' waits, the others the batch's durations."""
        stats = self._inference
        with self._lock:
            self.execution_count += 1
            self.inference_count += rows
            for key, ns in (
                ("queue", queue_ns),
                ("compute_input", input_ns * requests),
                ("compute_infer", infer_ns * requests),
                ("compute_output", output_ns * requests),
            ):
                stat = stats[key]
                stat[0] += requests
                stat[1] += ns
            per_size = self._batches.get(rows)
            if per_size is None:
                per_size = self._batches[rows] = {key: [0, 0] for key in BATCH_STATS}
            for key, ns in (
                ("compute_input", input_ns),
                ("compute_infer", infer_ns),
                ("compute_output", output_ns),
            ):
                stat = per_size[key]
                stat[0] += 1
                stat[1] += ns

    def set_memory(self, kind: str, device: int, nbytes: int) -> None:
        """The memory the loaded version holds on ``kind`` ("CPU", "GPU") ``device``."""
        with self._lock:
            self._memory[(kind, int(device))] = int(nbytes)

    def clear_memory(self) -> None:
        """The version was unloaded: it holds nothing any more."""
        with self._lock:
            self._memory.clear()

    # ---- reading

    def count(self, key: str) -> tuple[int, int]:
        """(count, ns) of one of :data:`INFERENCE_STATS`."""
        with self._lock:
            count, ns = self._inference[key]
        return count, ns

    @property
    def memory_bytes(self) -> int:
        with self._lock:
            return sum(self._memory.values())

    def to_triton(self) -> dict[str, Any]:
        """One ``$model_stat`` of Triton's statistics extension."""

        def duration(stat: list[int]) -> dict[str, int]:
            return {"count": stat[0], "ns": stat[1]}

        with self._lock:
            return {
                "name": self.name,
                "version": str(self.version),
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {k: duration(v) for k, v in self._inference.items()},
                "response_stats": {},
                "batch_stats": [
                    {"batch_size": size, **{k: duration(v) for k, v in stats.items()}}
                    for size, stats in sorted(self._batches.items())
                ],
                "memory_usage": [
                    {"type": kind, "id": device, "byte_size": nbytes}
                    for (kind, device), nbytes in sorted(self._memory.items())
                ],
            }
