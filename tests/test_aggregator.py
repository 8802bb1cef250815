"""StreamingAggregator: validation, float64 order independence, O(model) memory, trimmed mean."""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest
from fake_grid import delta_reply, small_model
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from server.strategy.aggregator import StreamingAggregator
from server.strategy.validation import array_view


def _deltas(rng: np.random.Generator, model: dict[str, np.ndarray], scale: float = 0.1):  # type: ignore[no-untyped-def]
    return {
        k: (rng.standard_normal(v.shape) * scale).astype(v.dtype)
        if v.dtype.kind == "f"
        else np.ones(v.shape, v.dtype)
        for k, v in model.items()
    }


def test_weighted_mean_of_deltas() -> None:
    model = small_model()
    rng = np.random.default_rng(0)
    deltas = [_deltas(rng, model) for _ in range(3)]
    agg = StreamingAggregator(model)
    for i, d in enumerate(deltas):
        assert agg.add(delta_reply(d, 10 * (i + 1), 0, i), node_id=i)
    mean = agg.mean_delta()
    expected = sum(10 * (i + 1) * d["w"].astype(np.float64) for i, d in enumerate(deltas)) / 60
    np.testing.assert_allclose(mean["w"], expected, rtol=1e-14)
    assert mean["w"].dtype == np.float64
    metrics = agg.metrics()
    assert metrics["train-loss"] == pytest.approx((10 * 1 + 20 * 2 + 30 * 3) / 60)
    assert metrics["num-examples"] == 60 and metrics["num-accepted"] == 3
    assert "partition-id" not in metrics and "version" not in metrics


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: {**d, "w": np.full_like(d["w"], np.nan)}, "non_finite"),
        (lambda d: {**d, "b": np.full_like(d["b"], np.inf)}, "non_finite"),
        (lambda d: {**d, "w": np.zeros((3, 4), np.float32)}, "shape"),
        (lambda d: {**d, "w": d["w"].astype(np.float64)}, "dtype"),
        (lambda d: {k: v for k, v in d.items() if k != "b"}, "keys"),
        (lambda d: {**d, "extra": np.zeros(2, np.float32)}, "keys"),
        (lambda d: {k: v * 1000 for k, v in d.items()}, "norm"),
    ],
    ids=["nan", "inf", "shape", "dtype", "missing-key", "extra-key", "norm"],
)
def test_bad_replies_are_rejected_and_counted(mutate, reason: str, caplog) -> None:  # type: ignore[no-untyped-def]
    model = small_model()
    agg = StreamingAggregator(model, max_update_norm=5.0)
    good = _deltas(np.random.default_rng(1), model)
    assert not agg.add(delta_reply(mutate(good), 10, 0, 3), node_id=42)
    assert agg.rejected == {reason: 1} and agg.num_accepted == 0
    assert "node 42" in caplog.text
    assert agg.add(delta_reply(good, 10, 0, 3), node_id=43)


@pytest.mark.parametrize("num_examples", [None, 0, -5, float("nan"), float("inf")])
def test_missing_or_bad_num_examples_is_rejected(num_examples) -> None:  # type: ignore[no-untyped-def]
    model = small_model()
    agg = StreamingAggregator(model)
    reply = delta_reply(_deltas(np.random.default_rng(2), model), None, 0, 0)
    if num_examples is not None:
        reply["metrics"]["num-examples"] = num_examples
    assert not agg.add(reply, node_id=1)
    assert agg.rejected == {"num_examples": 1}


def test_reply_without_arrays_is_rejected() -> None:
    agg = StreamingAggregator(small_model())
    assert not agg.add(RecordDict({"metrics": MetricRecord({"num-examples": 3})}), node_id=9)
    assert agg.rejected == {"no_arrays": 1}


def test_float64_accumulation_is_arrival_order_independent() -> None:
    rng = np.random.default_rng(3)
    model = {"w": np.zeros(20_000, np.float32)}
    replies = [
        (
            {"w": (rng.standard_normal(20_000) * 10.0 ** rng.integers(-3, 3)).astype(np.float32)},
            int(rng.integers(1, 500)),
        )
        for _ in range(12)
    ]
    results = []
    orders = [list(range(12)), list(reversed(range(12)))]
    orders += [list(rng.permutation(12)) for _ in range(4)]
    for order in orders:
        agg = StreamingAggregator(model)
        for i in order:
            agg.add(delta_reply(replies[i][0], replies[i][1], 0, int(i)), node_id=int(i))
        results.append(agg.mean_delta()["w"].astype(np.float32))
    for other in results[1:]:
        np.testing.assert_array_equal(results[0], other)
    # float32 accumulation would not be order independent on the same data
    f32 = []
    for order in orders[:2]:
        total = np.zeros(20_000, np.float32)
        for i in order:
            total += np.float32(replies[i][1]) * replies[i][0]["w"]
        f32.append(total)
    assert not np.array_equal(f32[0], f32[1])


def test_trimmed_mean_drops_extremes_per_coordinate() -> None:
    model = {"w": np.zeros(4, np.float32)}
    values = [
        [1.0, 2.0, 3.0, 4.0],
        [1.1, 2.1, 3.1, 4.1],
        [0.9, 1.9, 2.9, 3.9],
        [1000.0, -1000.0, 1000.0, -1000.0],
        [1.05, 2.05, 3.05, 4.05],
    ]
    agg = StreamingAggregator(model, aggregation="trimmed_mean", trim_fraction=0.2)
    for i, v in enumerate(values):
        agg.add(delta_reply({"w": np.array(v, np.float32)}, 1 + i, 0, i), node_id=i)
    stacked = np.sort(np.array(values, np.float32).astype(np.float64), axis=0)
    np.testing.assert_allclose(agg.mean_delta()["w"], stacked[1:4].mean(axis=0))
    assert np.all(np.abs(agg.mean_delta()["w"]) < 5)


def test_array_view_is_zero_copy_and_exact() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    for arr in (a, np.asfortranarray(a), np.array(5, np.int64)):
        item = Array(arr)
        view = array_view(item)
        np.testing.assert_array_equal(view, arr)
        assert view.shape == arr.shape and view.dtype == arr.dtype
    assert array_view(Array(a)).base is not None


def test_memory_is_o_model_not_o_clients() -> None:
    """Folding 50 replies of a 4 MB model peaks below 3x the model (the float64 sum is 2x)."""
    size = 1_000_000
    model = {"w": np.zeros((1000, 800), np.float32), "b": np.zeros(size - 800_000, np.float32)}
    model_bytes = sum(v.nbytes for v in model.values())
    rng = np.random.default_rng(4)
    payloads = [
        {k: Array(rng.standard_normal(v.shape).astype(np.float32)) for k, v in model.items()}
        for _ in range(3)
    ]
    agg = StreamingAggregator(model, max_update_norm=1e6)

    def replies():  # each reply shares pre-built payload bytes: no per-reply model copy
        for i, payload in zip(range(50), itertools.cycle(payloads), strict=False):
            record = ArrayRecord(
                {
                    k: Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data)
                    for k, a in payload.items()
                }
            )
            yield RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": i + 1})})

    tracemalloc.start()
    try:
        agg.reset()
        for i, content in enumerate(replies()):
            assert agg.add(content, node_id=i)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert agg.num_accepted == 50
    assert agg.mean_delta()["w"].shape == (1000, 800)
    # the float64 running sum is 2x a float32 model; holding the 50 replies would be 50x
    assert peak < 3 * model_bytes, peak / model_bytes
