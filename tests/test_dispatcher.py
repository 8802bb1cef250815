"""Dispatcher and pool: dynamic batching, least-loaded vs round robin, back-pressure, failover."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from serving_helpers import CLASSES, IN_FEATURES, classifier_weights, make_classifier

from serving.batching import Request
from serving.errors import DeadlineExceeded, Overloaded, Unavailable
from serving.pool import EnginePool
from serving.settings import ServingConfig
from serving.signature import ModelSignature
from serving.tensor_spec import TensorSpec

W, B = classifier_weights(1)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_classifier(tmp_path_factory.mktemp("disp") / "clf.onnx", seed=1)


SIG = ModelSignature.build(
    [TensorSpec("x", "FP32", (-1, IN_FEATURES))], [TensorSpec("logits", "FP32", (-1, CLASSES))], 64
)


@pytest.fixture
def make_pool(model_path: Path) -> Iterator:
    pools: list[EnginePool] = []

    def make(**kw) -> EnginePool:
        settings = ServingConfig(**{"instances": 2, "providers": "cpu", "inline_max_ms": 0, **kw})
        pool = EnginePool("clf", 1, model_path, SIG, settings)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close(5)


def slow_down(engine, seconds: float) -> None:
    run = engine.run

    def slow(feeds):
        time.sleep(seconds)
        return run(feeds)

    engine.run = slow


def submit_many(pool: EnginePool, xs: list[np.ndarray]) -> list[Request]:
    reqs = [Request({"x": x}, x.shape[0]) for x in xs]
    for r in reqs:
        pool.submit(r)
    return reqs


def test_dynamic_batching_concatenates_and_splits(make_pool) -> None:
    pool = make_pool(instances=1, max_queue_delay_ms=50)
    worker = pool.workers[0]
    slow_down(worker.engine, 0.05)
    rng = np.random.default_rng(0)
    xs = [rng.random((int(rng.integers(1, 4)), IN_FEATURES), dtype=np.float32) for _ in range(20)]
    reqs = submit_many(pool, xs)
    for x, r in zip(xs, reqs, strict=True):
        out = r.wait(10)["logits"]
        np.testing.assert_allclose(out, x @ W + B, rtol=1e-5, atol=1e-5)
    assert worker.batches < len(xs)  # requests were merged
    assert worker.items == sum(x.shape[0] for x in xs)
    assert max(i for i, c in enumerate(worker.batch_size_counts) if c) > 3


def test_batches_respect_max_batch_size(make_pool) -> None:
    pool = make_pool(instances=1, max_batch_size=4, max_queue_delay_ms=20)
    slow_down(pool.workers[0].engine, 0.02)
    reqs = submit_many(pool, [np.ones((1, IN_FEATURES), np.float32)] * 12)
    for r in reqs:
        r.wait(10)
    counts = pool.workers[0].batch_size_counts
    assert sum(counts[5:]) == 0 and counts[4] >= 1


@pytest.mark.parametrize("policy", ["least_loaded", "round_robin"])
def test_least_loaded_avoids_slow_engine(make_pool, policy: str) -> None:
    pool = make_pool(instances=2, policy=policy, max_batch_size=1)
    slow, fast = pool.workers
    slow_down(slow.engine, 0.05)
    x = np.ones((1, IN_FEATURES), np.float32)
    # 4 clients, each sending its next request when the previous one is answered
    engines: Counter[str] = Counter()
    lock = threading.Lock()

    def client() -> None:
        for _ in range(10):
            r = Request({"x": x}, 1)
            pool.submit(r)
            r.wait(10)
            with lock:
                engines[r.engine] += 1

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(engines.values()) == 40
    if policy == "least_loaded":
        assert engines[fast.name] >= 0.8 * 40, engines
    else:
        assert abs(engines[fast.name] - engines[slow.name]) <= 4, engines


def test_idle_engine_wins_over_slowed_one(make_pool) -> None:
    pool = make_pool(instances=2, max_batch_size=1)
    a, b = pool.workers
    slow_down(a.engine, 0.2)
    first = Request({"x": np.ones((1, IN_FEATURES), np.float32)}, 1)
    a.offer(first)  # a is now busy
    time.sleep(0.02)
    r = Request({"x": np.ones((1, IN_FEATURES), np.float32)}, 1)
    pool.submit(r)
    r.wait(5)
    assert r.engine == b.name
    first.wait(5)


def test_back_pressure_raises_overloaded_with_retry_after(make_pool) -> None:
    pool = make_pool(instances=1, max_batch_size=1, max_queue_items=3)
    slow_down(pool.workers[0].engine, 0.1)
    x = np.ones((1, IN_FEATURES), np.float32)
    accepted = []
    with pytest.raises(Overloaded) as info:
        for _ in range(20):
            r = Request({"x": x}, 1)
            pool.submit(r)
            accepted.append(r)
    assert info.value.status == 429
    assert int(info.value.headers["Retry-After"]) >= 1
    assert 3 <= len(accepted) <= 5  # queue bound (+ the one running)
    assert pool.workers[0].queued_items <= 3
    for r in accepted:
        r.wait(10)


def test_failing_engine_is_replaced_and_requests_retried(make_pool) -> None:
    pool = make_pool(instances=2, max_batch_size=4, max_queue_delay_ms=0)
    bad = pool.workers[0]

    def boom(feeds):
        time.sleep(0.01)
        raise RuntimeError("simulated engine crash")

    bad.engine.run = boom
    x = np.random.default_rng(1).random((1, IN_FEATURES), dtype=np.float32)
    reqs = submit_many(pool, [x] * 30)
    for r in reqs:
        np.testing.assert_allclose(r.wait(10)["logits"], x @ W + B, rtol=1e-5, atol=1e-5)
    assert bad.dead and pool.engine_failures == 1
    deadline = time.monotonic() + 10
    while pool.replacements < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pool.replacements == 1
    assert len(pool.workers) == 2 and bad not in pool.workers
    assert pool.infer({"x": x})["logits"].shape == (1, CLASSES)


def test_every_engine_failing_answers_503_without_hanging(make_pool) -> None:
    pool = make_pool(instances=2, replace_attempts=1)

    def boom(feeds):
        raise RuntimeError("simulated engine crash")

    for w in pool.workers:
        w.engine.run = boom
    reqs = submit_many(pool, [np.ones((1, IN_FEATURES), np.float32)] * 4)
    for r in reqs:
        with pytest.raises(Unavailable):
            r.wait(10)


def test_hung_run_is_answered_504_not_retried_and_its_engine_abandoned(make_pool) -> None:
    """A run past run_timeout_s is answered 504 at once and never retried on another engine (that
    would burn a second core on the same input); a run that does not stop (here a Python sleep,
    which onnxruntime's terminate flag cannot reach) gets its engine abandoned after the grace,
    and the requests queued behind it are served elsewhere."""
    pool = make_pool(instances=2, run_timeout_s=0.3, max_batch_size=1)
    hung = pool.workers[0]
    slow_down(hung.engine, 3.0)
    r = Request({"x": np.ones((1, IN_FEATURES), np.float32)}, 1)
    behind = Request({"x": np.ones((1, IN_FEATURES), np.float32)}, 1)
    assert hung.offer(r) == 0 and hung.offer(behind) == 0
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="run_timeout_s=0.3 s"):
        r.wait(5)
    assert time.monotonic() - t0 < 1.5
    assert r.engine == hung.name and r.error.status == 504 and hung.timeouts == 1
    behind.wait(5)
    assert behind.engine != hung.name
    assert hung.dead and hung not in pool.workers


def test_close_drains_queue_then_refuses(make_pool) -> None:
    pool = make_pool(instances=1, max_batch_size=1)
    slow_down(pool.workers[0].engine, 0.02)
    reqs = submit_many(pool, [np.ones((1, IN_FEATURES), np.float32)] * 10)
    pool.close(10)
    assert all(r.done and r.error is None for r in reqs)
    with pytest.raises(Unavailable):
        pool.submit(Request({"x": np.ones((1, IN_FEATURES), np.float32)}, 1))


def test_inline_run_for_fast_models(make_pool) -> None:
    pool = make_pool(instances=1, inline_max_ms=50)
    x = np.ones((1, IN_FEATURES), np.float32)
    pool.infer({"x": x})  # first run measures the EWMA
    r = Request({"x": x}, 1)
    assert pool.submit(r, inline=True) is True
    assert r.done and r.outputs is not None
