"""Section 4, ``dispatch``: the dispatcher's overhead per request, in-process, with a null engine
(no model), so what is timed is selection, queueing, batching and wake-up alone."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import numpy as np

from benchmarks.serving.config import CONNECTIONS


class NullEngine:
    """Looks like serving.engine.Engine to a Worker; run returns its input (no model)."""

    def __init__(self, name: str, signature: Any) -> None:
        self.name = name
        self.signature = signature
        self.providers = ["none"]
        self.output_names = ["y"]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": feeds["x"]}

    def close(self) -> None:
        pass


def _null_pool(**settings: Any) -> Any:
    """An ``EnginePool`` of 2 :class:`NullEngine` workers; ``settings`` override ServingConfig."""
    from serving.pool import EnginePool
    from serving.settings import ServingConfig
    from serving.signature import ModelSignature

    sig = ModelSignature.build(
        [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
        64,
    )
    base = {"instances": 2, "providers": "cpu", "run_timeout_s": 0}
    return EnginePool(
        "null",
        1,
        "/nonexistent.onnx",
        sig,
        ServingConfig(**(base | settings)),
        engine_factory=lambda name: NullEngine(name, sig),
    )


def _pcts(samples: list[float]) -> dict[str, float]:
    """p50/p99 in microseconds of ``samples`` in seconds, and their count."""
    a = np.array(samples) * 1e6
    return {
        "p50_us": float(np.percentile(a, 50)),
        "p99_us": float(np.percentile(a, 99)),
        "n": len(a),
    }


async def _async_samples(pool: Any, feeds: dict, n: int) -> list[float]:
    """``n`` sequential validate + ``infer_async`` calls, each timed (seconds)."""
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        rows = pool.signature.validate(feeds)
        req = await pool.infer_async(feeds, rows)
        assert req.error is None
        samples.append(time.perf_counter() - t0)
    return samples


async def _capacity(pool: Any, feeds: dict, seconds: float) -> dict[str, float]:
    """``CONNECTIONS`` concurrent async callers for ``seconds``: req/s and CPU us per request."""
    stop = time.perf_counter() + seconds
    done = [0]

    async def client() -> None:
        while time.perf_counter() < stop:
            await pool.infer_async(feeds, 1)
            done[0] += 1

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CONNECTIONS)))
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return {"requests_per_s": done[0] / wall, "cpu_us_per_request": cpu / max(1, done[0]) * 1e6}


def dispatch_section(args: argparse.Namespace) -> dict[str, Any]:
    """Per-call p50/p99 of ``Dispatcher.select`` (both policies), the blocking and async queued
    paths, the async inline path (``args.dispatch_n`` calls each), and the queued capacity with
    32 concurrent callers."""
    n = args.dispatch_n
    feeds = {"x": np.zeros((1, 4), np.float32)}
    out: dict[str, Any] = {}
    pool = _null_pool(max_queue_delay_ms=0.0, inline_max_ms=0.0)
    try:
        pool.infer(feeds)
        for policy in ("least_loaded", "round_robin"):
            pool.dispatcher.policy = policy
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                pool.dispatcher.select(pool.workers)
                samples.append(time.perf_counter() - t0)
            out[f"select_{policy}"] = _pcts(samples)
        pool.dispatcher.policy = "least_loaded"
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            pool.infer(feeds)
            samples.append(time.perf_counter() - t0)
        out["blocking_queued"] = _pcts(samples)
        out["async_queued"] = _pcts(asyncio.run(_async_samples(pool, feeds, n)))
    finally:
        pool.close(5)
    pool = _null_pool(max_queue_delay_ms=0.0)  # default inline_max_ms=1
    try:
        pool.infer(feeds)  # the inline check needs one measured run
        out["async_inline"] = _pcts(asyncio.run(_async_samples(pool, feeds, n)))
    finally:
        pool.close(5)
    pool = _null_pool(inline_max_ms=0.0)  # default max_queue_delay_ms=1
    try:
        out["capacity_32_concurrent"] = asyncio.run(_capacity(pool, feeds, 2.0))
    finally:
        pool.close(5)
    return out
