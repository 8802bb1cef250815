"""Per-version statistics in Triton's shape (serving/statistics.py), recorded by requests and
batches as they complete."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from serving_helpers import CLASSES, IN_FEATURES, make_classifier

from serving.batching import Request
from serving.errors import Unavailable
from serving.pool import EnginePool
from serving.settings import ServingConfig
from serving.signature import ModelSignature
from serving.statistics import ModelStatistics
from serving.tensor_spec import TensorSpec


def test_to_triton_has_tritons_field_names_and_sums() -> None:
    stats = ModelStatistics("m", 3)
    stats.record_execution(2, 5, queue_ns=300, input_ns=10, infer_ns=100, output_ns=20)
    stats.record_execution(1, 1, queue_ns=50, input_ns=1, infer_ns=40, output_ns=2)
    stats.record_request(True, 1_000)
    stats.record_request(True, 2_000)
    stats.record_request(True, 3_000)
    stats.record_request(False, 500)
    stats.set_memory("CPU", 0, 4096)
    doc = stats.to_triton()
    assert doc.pop("last_inference") > 1_600_000_000_000  # ms since the epoch
    assert doc == {
        "name": "m",
        "version": "3",
        "inference_count": 6,
        "execution_count": 2,
        "inference_stats": {
            "success": {"count": 3, "ns": 6_000},
            "fail": {"count": 1, "ns": 500},
            "queue": {"count": 3, "ns": 350},
            "compute_input": {"count": 3, "ns": 2 * 10 + 1},
            "compute_infer": {"count": 3, "ns": 2 * 100 + 40},
            "compute_output": {"count": 3, "ns": 2 * 20 + 2},
            "cache_hit": {"count": 0, "ns": 0},
            "cache_miss": {"count": 0, "ns": 0},
        },
        "response_stats": {},
        "batch_stats": [
            {
                "batch_size": 1,
                "compute_input": {"count": 1, "ns": 1},
                "compute_infer": {"count": 1, "ns": 40},
                "compute_output": {"count": 1, "ns": 2},
            },
            {
                "batch_size": 5,
                "compute_input": {"count": 1, "ns": 10},
                "compute_infer": {"count": 1, "ns": 100},
                "compute_output": {"count": 1, "ns": 20},
            },
        ],
        "memory_usage": [{"type": "CPU", "id": 0, "byte_size": 4096}],
    }
    stats.clear_memory()
    assert stats.to_triton()["memory_usage"] == [] and stats.memory_bytes == 0


def test_a_pool_records_every_request_and_batch(tmp_path: Path) -> None:
    path = make_classifier(tmp_path / "clf.onnx", seed=1)
    sig = ModelSignature.build(
        [TensorSpec("x", "FP32", (-1, IN_FEATURES))],
        [TensorSpec("logits", "FP32", (-1, CLASSES))],
        8,
    )
    settings = ServingConfig(instances=1, providers="cpu", inline_max_ms=0, max_queue_delay_ms=50)
    pool = EnginePool("clf", 1, path, sig, settings)
    try:
        requests = [Request({"x": np.ones((2, IN_FEATURES), np.float32)}, 2) for _ in range(3)]
        for req in requests:
            pool.submit(req)
        for req in requests:
            req.wait(10)
        bad = Request({"x": np.ones((1, IN_FEATURES), np.float32)}, 1)

        def broken(feeds: dict) -> dict:
            raise RuntimeError("engine lost")

        pool.workers[0].engine.run = broken
        pool.submit(bad)
        with pytest.raises(Unavailable):
            bad.wait(10)
    finally:
        pool.close(5)
    doc = pool.stats.to_triton()
    assert doc["inference_count"] == 6
    assert doc["inference_stats"]["success"]["count"] == 3
    assert doc["inference_stats"]["fail"]["count"] == 1
    assert doc["inference_stats"]["queue"]["count"] == 3
    assert doc["execution_count"] == sum(b["compute_infer"]["count"] for b in doc["batch_stats"])
    assert doc["execution_count"] < 3  # batched


@pytest.mark.parametrize("inline_max_ms", [0, 1000], ids=["batched", "inline"])
def test_a_request_is_answered_after_its_execution_is_counted(
    tmp_path: Path, inline_max_ms: int
) -> None:
    """tritonclient's get_inference_statistics right after an answer must count that answer's
    execution: the worker used to finish the requests first and record the batch after."""
    path = make_classifier(tmp_path / "clf.onnx", seed=1)
    sig = ModelSignature.build(
        [TensorSpec("x", "FP32", (-1, IN_FEATURES))],
        [TensorSpec("logits", "FP32", (-1, CLASSES))],
        8,
    )
    settings = ServingConfig(instances=1, providers="cpu", inline_max_ms=inline_max_ms)
    pool = EnginePool("clf", 1, path, sig, settings)
    answered_before_counted: list[bool] = []
    record_execution = pool.stats.record_execution

    def check_then_record(batch: int, rows: int, *args: int) -> None:
        answered_before_counted.append(current[-1].done)
        record_execution(batch, rows, *args)

    pool.stats.record_execution = check_then_record  # type: ignore[method-assign]
    current: list[Request] = []  # one request at a time: each batch is that request
    try:
        for _ in range(4):
            current.append(Request({"x": np.ones((1, IN_FEATURES), np.float32)}, 1))
            pool.submit(current[-1])
            current[-1].wait(10)
    finally:
        pool.close(5)
    assert answered_before_counted and not any(answered_before_counted)
