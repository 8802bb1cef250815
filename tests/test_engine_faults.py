"""Faults inside the engines (issue 14, serving items 1 and 2), with models built here that fail
or run long for some inputs only: a request the model fails on is answered 400 and fails no
other request nor engine; a run past serving.run_timeout_s is stopped (RunOptions.terminate),
answered 504 and never retried; inline runs are bounded; every request gets one answer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import psutil
import pytest
from onnx import TensorProto, helper, numpy_helper

from serving.batching import Request
from serving.errors import DeadlineExceeded, InputError
from serving.pool import EnginePool
from serving.settings import ServingConfig
from serving.signature import ModelSignature
from serving.tensor_spec import TensorSpec

WIDTH = 5


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def broadcast_model(path: Path) -> Path:
    """``y = x * W`` with ``x: FP32[batch, w]`` and ``W: [1, 5]``: widths 1 and 5 broadcast,
    any other width makes onnxruntime raise ``Fail`` (not ``InvalidArgument``)."""
    w = numpy_helper.from_array(np.full((1, WIDTH), 2.0, np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "W"], ["y"])],
        "broadcast",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", WIDTH])],
        [w],
    )
    return _save(graph, path)


def topk_model(path: Path) -> Path:
    """``y = x`` (``FP32[batch, 1]``), after a TopK whose k is the batch's largest value: a row
    above 4 makes its whole batch raise ``Fail``, rows up to 4 are fine."""
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
        helper.make_node("Cast", ["m"], ["mi"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["mi", "one"], ["k"]),
        helper.make_node("TopK", ["D", "k"], ["vals", "idx"]),
        helper.make_node("ReduceSum", ["vals"], ["s"], keepdims=0),
        helper.make_node("Mul", ["s", "zero"], ["z"]),
        helper.make_node("Add", ["x", "z"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.arange(4, dtype=np.float32), "D"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array(0, np.float32), "zero"),
    ]
    graph = helper.make_graph(
        nodes,
        "topk",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    return _save(graph, path)


def loop_model(path: Path) -> Path:
    """``y = x + trips`` where ``trips`` = the batch's largest value: a Loop of that many
    iterations (about 3 us each), so ``x = 1e9`` runs for hours unless it is stopped."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["acc_in", "one"], ["acc_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, ["batch", 1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["batch", 1]),
        ],
        [numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
            helper.make_node("Cast", ["m"], ["trips"], to=TensorProto.INT64),
            helper.make_node("Loop", ["trips", "true", "x"], ["y"], body=body),
        ],
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(np.array(True), "true")],
    )
    return _save(graph, path)


def signature(width: int | None, max_batch_size: int = 64) -> ModelSignature:
    out = WIDTH if width is None else width
    return ModelSignature.build(
        [TensorSpec("x", "FP32", (-1, -1 if width is None else width))],
        [TensorSpec("y", "FP32", (-1, out))],
        max_batch_size,
    )


@pytest.fixture
def make_pool(tmp_path: Path) -> Iterator:
    pools: list[EnginePool] = []

    def make(path: Path, sig: ModelSignature, **settings: object) -> EnginePool:
        base = {"instances": 2, "providers": "cpu", "inline_max_ms": 0}
        pool = EnginePool("m", 1, path, sig, ServingConfig(**(base | settings)))
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close(5)


def test_a_request_the_model_fails_on_gets_400_and_takes_no_engine_out(
    tmp_path: Path, make_pool
) -> None:
    """Before: onnxruntime's ``Fail`` (any class but InvalidArgument) took the engine out, the
    poison request was retried on a second engine (taking that out too) and the innocent
    requests queued behind it got 503."""
    pool = make_pool(broadcast_model(tmp_path / "b.onnx"), signature(None), max_queue_delay_ms=5)
    rng = np.random.default_rng(0)
    innocent = [rng.random((int(rng.integers(1, 4)), WIDTH), dtype=np.float32) for _ in range(60)]
    poison = [np.ones((1, 3), np.float32) for _ in range(6)]
    requests: list[tuple[np.ndarray, Request]] = []
    for i, x in enumerate(innocent):
        requests.append((x, Request({"x": x}, x.shape[0])))
        if i % 10 == 0:
            bad = poison[i // 10]
            requests.append((bad, Request({"x": bad}, 1)))
    for _, req in requests:
        pool.submit(req)
    for x, req in requests:
        if x.shape[1] == WIDTH:
            np.testing.assert_allclose(req.wait(10)["y"], 2 * x)
            continue
        with pytest.raises(InputError) as info:
            req.wait(10)
        message = info.value.message
        assert info.value.status == 400
        assert "Attempting to broadcast an axis by a dimension other than 1. 3 by 5" in message
        assert "onnxruntime_src" not in message and ".h:" not in message
    assert pool.engine_failures == 0 and pool.replacements == 0
    assert len(pool.workers) == 2 and not any(w.dead for w in pool.workers)


def test_a_poison_row_in_a_batch_fails_alone(tmp_path: Path, make_pool) -> None:
    """A value that makes the whole batch fail (``Fail`` again): the batch is rerun request by
    request on the same engine, so only the poison request fails."""
    pool = make_pool(
        topk_model(tmp_path / "t.onnx"), signature(1), instances=1, max_queue_delay_ms=200
    )
    xs = [np.full((1, 1), v, np.float32) for v in (1, 2, 9, 3, 4, 0)]
    requests = [Request({"x": x}, 1) for x in xs]
    for req in requests:
        pool.submit(req)
    for x, req in zip(xs, requests, strict=True):
        if x[0, 0] > 4:
            with pytest.raises(InputError, match=r"k argument \[9\] should not be greater"):
                req.wait(10)
        else:
            np.testing.assert_allclose(req.wait(10)["y"], x)
    worker = pool.workers[0]
    assert max(i for i, c in enumerate(worker.batch_size_counts) if c) == 1  # reruns, one by one
    assert pool.engine_failures == 0 and not worker.dead


def test_an_engine_is_taken_out_only_when_its_known_good_input_fails_too(
    tmp_path: Path, make_pool
) -> None:
    pool = make_pool(topk_model(tmp_path / "t.onnx"), signature(1))
    broken = pool.workers[0]

    def crash(feeds: dict) -> dict:
        raise RuntimeError("device lost")

    broken.engine.run = crash
    for w in pool.workers:  # make the broken one the dispatcher's first pick
        w.ewma_item_s = w.ewma_s = 0.0 if w is broken else 1.0
    x = np.ones((1, 1), np.float32)
    req = Request({"x": x}, 1)
    pool.submit(req)
    np.testing.assert_allclose(req.wait(10)["y"], x)  # retried on the healthy engine
    assert broken.dead and pool.engine_failures == 1


def test_a_run_past_the_timeout_is_stopped_answered_504_and_not_retried(
    tmp_path: Path, make_pool
) -> None:
    """Before: the run went on burning a core after it was abandoned, and the request was
    retried on a second engine, which burned another."""
    pool = make_pool(loop_model(tmp_path / "l.onnx"), signature(1), run_timeout_s=0.5)
    slow = Request({"x": np.full((1, 1), 1e9, np.float32)}, 1)
    pool.submit(slow)
    with pytest.raises(DeadlineExceeded, match="run_timeout_s=0.5 s") as info:
        slow.wait(20)
    assert info.value.status == 504
    ran_it = next(w for w in pool.workers if w.name == slow.engine)
    deadline = time.monotonic() + 10
    while ran_it.running_since and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not ran_it.running_since  # the run itself stopped, not just its answer
    process = psutil.Process()
    cpu = sum(process.cpu_times()[:2])
    time.sleep(0.5)
    assert sum(process.cpu_times()[:2]) - cpu < 0.25  # no core left spinning
    assert all(w.batches == 0 for w in pool.workers)  # nothing retried it
    assert ran_it.timeouts == 1 and pool.engine_failures == 0 and not ran_it.dead
    ok = Request({"x": np.full((1, 1), 3.0, np.float32)}, 1)
    pool.submit(ok)
    np.testing.assert_allclose(ok.wait(10)["y"], [[6.0]])  # the stopped engine serves on


def test_inline_runs_are_bounded_and_then_go_to_a_worker_thread(tmp_path: Path, make_pool) -> None:
    """Before: an inline run blocked the event loop for its whole duration (an hour here)."""
    pool = make_pool(
        loop_model(tmp_path / "l.onnx"),
        signature(1),
        instances=1,
        inline_max_ms=20,
        run_timeout_s=1.0,
    )
    fast = {"x": np.full((1, 1), 2.0, np.float32)}
    pool.infer(fast)  # measured: far below inline_max_ms, so it may run inline now

    async def scenario() -> tuple[Request, Request, float]:
        gaps: list[float] = []
        stop = asyncio.Event()

        async def heartbeat() -> None:
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        beat = asyncio.create_task(heartbeat())
        await asyncio.sleep(0.05)
        inline = await pool.infer_async(fast, 1)
        slow = await pool.infer_async({"x": np.full((1, 1), 1e9, np.float32)}, 1)
        stop.set()
        await beat
        return inline, slow, max(gaps)

    inline, slow, longest_gap = asyncio.run(scenario())
    assert inline.error is None and inline.t_start and inline.engine
    assert isinstance(slow.error, DeadlineExceeded)
    assert longest_gap < 0.9  # the loop was blocked for the inline bound, not for the run
    assert pool.workers[0].peak_s >= 0.02  # and that engine runs nothing inline for a while


def first_inline_run(
    tmp_path: Path, make_pool, inline_max_ms: float, first_run: Callable[[], None]
) -> tuple[EnginePool, Request]:
    """A one-engine pool of a fast model (so its requests run inline) with run_timeout_s=0.2,
    whose next run calls ``first_run`` before it runs (a sleep, a failure); returns the pool and
    that run's inline request."""
    pool = make_pool(
        topk_model(tmp_path / "t.onnx"),
        signature(1),
        instances=1,
        inline_max_ms=inline_max_ms,
        run_timeout_s=0.2,
    )
    x = {"x": np.ones((1, 1), np.float32)}
    pool.infer(x)  # a measured, fast model: inline from now on
    engine = pool.workers[0].engine
    run = engine.run
    first = threading.Event()

    def once(feeds: dict) -> dict:
        if not first.is_set():
            first.set()
            first_run()
        return run(feeds)

    engine.run = once

    async def scenario() -> Request:
        return await asyncio.wait_for(pool.infer_async(x, 1), 10)

    return pool, asyncio.run(scenario())


def test_an_inline_run_answered_by_the_watchdog_then_failing_leaves_the_engine_usable(
    tmp_path: Path, make_pool
) -> None:
    """Before: an inline run that the watchdog answered 504 (past run_timeout_s, below the inline
    bound) and that then raised left its worker marked busy with a failure to isolate: the worker
    never took another batch and its version never read as idle (never evictable)."""

    def slow_then_fail() -> None:
        time.sleep(0.6)  # past run_timeout_s: the watchdog answers 504
        raise RuntimeError("the engine failed after its answer")

    pool, req = first_inline_run(tmp_path, make_pool, 100, slow_then_fail)  # inline bound 1 s
    assert isinstance(req.error, DeadlineExceeded)
    worker = pool.workers[0]
    deadline = time.monotonic() + 5
    while worker.outstanding and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.outstanding == 0
    x = np.ones((1, 1), np.float32)
    np.testing.assert_allclose(pool.infer({"x": x}, timeout=5)["y"], x)  # a batch runs again


def test_run_timeout_holds_for_inline_runs(tmp_path: Path, make_pool) -> None:
    """Before: while inline runs happened the watchdog looked every half inline bound (2.5 s
    here) instead of every run_timeout_s / 4, so an inline run of 1 s past a 0.2 s timeout was
    answered 200 as if no limit were set."""
    pool, req = first_inline_run(tmp_path, make_pool, 500, lambda: time.sleep(1.0))  # bound 5 s
    assert req.engine == pool.workers[0].name
    assert isinstance(req.error, DeadlineExceeded)


def test_an_abandoned_inline_request_is_answered(tmp_path: Path, make_pool) -> None:
    """Before: an inline request whose engine the watchdog abandoned was never answered (the
    worker had not registered it as running), so its caller waited forever."""
    pool = make_pool(
        topk_model(tmp_path / "t.onnx"), signature(1), inline_max_ms=50, run_timeout_s=1.0
    )
    first = pool.workers[0]
    x = {"x": np.ones((1, 1), np.float32)}
    pool.infer(x)  # a measured, fast model: inline from now on
    for w in pool.workers:
        w.ewma_item_s = w.ewma_s = 0.0 if w is first else 1.0
        w.batches = max(w.batches, 1)
    run = first.engine.run
    calls = threading.local()

    def hang_once(feeds: dict) -> dict:
        if not getattr(calls, "done", False):
            calls.done = True
            time.sleep(3.0)  # past run_timeout_s and the grace: onnxruntime cannot stop a sleep
        return run(feeds)

    first.engine.run = hang_once

    async def scenario() -> Request:
        return await asyncio.wait_for(pool.infer_async(x, 1), 20)

    req = asyncio.run(scenario())
    assert isinstance(req.error, DeadlineExceeded) and req.engine == first.name
    assert first.dead and first not in pool.workers
    np.testing.assert_allclose(pool.infer(x)["y"], x["x"])  # the other engine serves on
