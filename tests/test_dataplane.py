"""The dataplane on its own (no HTTP): lookup errors, validation before dispatch, retry when a
swap closes the pool under a request, the documents, and the request metrics."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
from google.protobuf import json_format
from serving_helpers import IN_FEATURES, classifier_weights
from tritonclient.grpc import model_config_pb2

from serving.dataplane import DataPlane
from serving.errors import BadRequest, InputError, NotFound, PoolClosed
from serving.inference import InferRequest
from serving.pool import EnginePool
from serving.registry import ModelRegistry


def expected(x: np.ndarray, seed: int) -> np.ndarray:
    w, b = classifier_weights(seed)
    return x @ w + b


X = np.arange(2 * IN_FEATURES, dtype=np.float32).reshape(2, IN_FEATURES) / 10


def test_lookup_errors_carry_http_and_grpc_status(make_pool) -> None:
    registry = ModelRegistry()
    registry.add(make_pool(1, seed=1))
    dataplane = DataPlane(registry)
    assert dataplane.lookup("clf").version == 1 and dataplane.lookup("clf", "1").version == 1
    cases = {
        ("nope", None): "unknown model 'nope'; loaded models: clf",
        ("clf", "9"): "unknown version 9 of model 'clf'; loaded versions: [1]",
        ("clf", "x"): "unknown version 'x' of model 'clf'",
    }
    for (name, version), message in cases.items():
        with pytest.raises(NotFound) as info:
            dataplane.lookup(name, version)
        assert message in info.value.message
        assert (info.value.status, info.value.grpc_code) == (404, "NOT_FOUND")
    with pytest.raises(NotFound):
        asyncio.run(dataplane.model_metadata("nope"))


def test_infer_answers_and_names_model_version_and_outputs(make_pool) -> None:
    registry = ModelRegistry()
    registry.add(make_pool(1, seed=1))
    dataplane = DataPlane(registry)
    pool = dataplane.lookup("clf")
    result = asyncio.run(dataplane.infer(pool, InferRequest({"x": X}, id="r1"), None))
    assert (result.model_name, result.model_version, result.id) == ("clf", 1, "r1")
    assert result.output_names == ["logits"]
    np.testing.assert_allclose(result.outputs["logits"], expected(X, 1), rtol=1e-5, atol=1e-5)
    asked = InferRequest({"x": X}, outputs=[("logits", True)])
    assert asyncio.run(dataplane.infer(pool, asked, None)).output_names == ["logits"]


def test_invalid_requests_fail_before_dispatch_with_both_statuses(make_pool) -> None:
    registry = ModelRegistry()
    registry.add(pool := make_pool(1, seed=1))
    dataplane = DataPlane(registry)
    worker = pool.workers[0]
    items = worker.items
    bad_shape = InferRequest({"x": np.zeros((1, 5), np.float32)})
    with pytest.raises(InputError) as info:
        asyncio.run(dataplane.infer(pool, bad_shape, None))
    assert (info.value.status, info.value.grpc_code) == (400, "INVALID_ARGUMENT")
    assert "input 'x': shape [1, 5] does not match the model's x: FP32 [-1, 4]" in str(info.value)
    unknown_output = InferRequest({"x": X}, outputs=[("nope", False)])
    with pytest.raises(BadRequest, match="unknown output 'nope'; model 'clf' has outputs logits"):
        asyncio.run(dataplane.infer(pool, unknown_output, None))
    assert worker.items == items  # neither reached the engine


def test_retry_on_swap_goes_to_the_new_version(make_pool) -> None:
    registry = ModelRegistry()
    old = make_pool(1, seed=1)
    registry.add(old)
    dataplane = DataPlane(registry)
    pool = dataplane.lookup("clf")  # a front end looked v1 up, then the swap happened:
    registry.add(make_pool(2, seed=2))
    registry.remove("clf", 1)
    old.close(5)
    result = asyncio.run(dataplane.infer(pool, InferRequest({"x": X}), None))
    assert result.model_version == 2
    np.testing.assert_allclose(result.outputs["logits"], expected(X, 2), rtol=1e-5, atol=1e-5)


def test_retry_on_swap_validates_against_a_changed_signature(make_pool) -> None:
    registry = ModelRegistry()
    old = make_pool(1, seed=1)
    registry.add(old)
    dataplane = DataPlane(registry)
    registry.add(make_pool(2, seed=2, max_batch_size=1))  # the new version takes 1 row at most
    registry.remove("clf", 1)
    old.close(5)
    with pytest.raises(InputError, match=r"batch size 2 is outside 1\.\.1"):
        asyncio.run(dataplane.infer(old, InferRequest({"x": X}), None))


def test_closed_pool_without_a_successor(make_pool) -> None:
    registry = ModelRegistry()
    pool = make_pool(1, seed=1)
    registry.add(pool)
    dataplane = DataPlane(registry)
    pool.close(5)  # closed but still registered: nothing to retry on
    with pytest.raises(PoolClosed) as info:
        asyncio.run(dataplane.infer(pool, InferRequest({"x": X}), None))
    assert (info.value.status, info.value.grpc_code) == (503, "UNAVAILABLE")
    assert info.value.headers["Retry-After"] == "1"
    registry.remove("clf", 1)  # and once it is gone the model is unknown
    with pytest.raises(NotFound):
        asyncio.run(dataplane.infer(pool, InferRequest({"x": X}), None))


def test_documents(make_pool) -> None:
    registry = ModelRegistry()
    registry.add(make_pool(1, seed=1))
    registry.add(make_pool(2, seed=2))
    dataplane = DataPlane(registry, ready=lambda: False)
    assert asyncio.run(dataplane.ready()) is False
    assert asyncio.run(dataplane.server_metadata())["name"] == "fedserve"
    meta = asyncio.run(dataplane.model_metadata("clf"))
    assert meta["versions"] == ["1", "2"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, IN_FEATURES]}]
    assert asyncio.run(dataplane.model_ready("clf", "1")) == {
        "name": "clf",
        "version": "1",
        "ready": True,
    }
    config = asyncio.run(dataplane.model_config("clf"))
    # Triton's ModelConfig as protobuf's JSON, nothing more (no top-level "version")
    proto = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    assert json_format.MessageToDict(proto, preserving_proto_field_name=True) == config
    assert proto.name == "clf" and proto.max_batch_size == 64
    assert list(proto.input[0].dims) == [IN_FEATURES] and proto.input[0].data_type == 11
    assert proto.dynamic_batching.max_queue_delay_microseconds == 1000
    assert proto.instance_group[0].count == 1
    assert proto.parameters["policy"].string_value == "least_loaded"
    assert asyncio.run(dataplane.repository_index()) == [
        {"name": "clf", "version": "1", "state": "READY", "reason": ""},
        {"name": "clf", "version": "2", "state": "READY", "reason": ""},
    ]


def test_metrics_label_unknown_names_apart(make_pool) -> None:
    registry = ModelRegistry()
    registry.add(make_pool(1, seed=1))
    dataplane = DataPlane(registry)
    result = asyncio.run(dataplane.infer(dataplane.lookup("clf"), InferRequest({"x": X}), None))
    dataplane.record_success(result, 0.01)
    dataplane.record_failure("clf", 400)
    dataplane.record_failure("no-such-model-1", 404)
    dataplane.record_failure("no-such-model-2", 404)
    text = dataplane.metrics.render().decode()
    assert 'fedserve_requests_total{model="clf",version="1"} 1.0' in text
    assert 'fedserve_request_failures_total{code="400",model="clf"} 1.0' in text
    assert 'fedserve_request_failures_total{code="404",model="_unknown"} 2.0' in text
    assert "no-such-model" not in text


def test_a_request_outlasts_evictions_between_its_lookup_and_its_dispatch(make_pool) -> None:
    """Before: under a thrashing on-demand cache, a version evicted between a request's lookup
    and its dispatch three times in a row (each retry reloading it) failed the request with 503
    "is being swapped" (scheduler benchmark, LRU-only); with a scheduler a request now retries for
    as long as it may wait for a load (serving.load_timeout_s)."""
    registry = ModelRegistry()
    dataplane = DataPlane(registry)
    dataplane.scheduler = SimpleNamespace(load_timeout_s=30.0)  # type: ignore[assignment]
    evicted = [make_pool(1, seed=1) for _ in range(5)]
    for pool in evicted:
        pool.close(5)
    survivor = make_pool(1, seed=1)
    reloads = iter([*evicted[1:], survivor])

    async def acquire(name: str, version: str | int | None = None) -> EnginePool:
        return next(reloads)

    dataplane.acquire = acquire  # type: ignore[method-assign]
    result = asyncio.run(dataplane.infer(evicted[0], InferRequest({"x": X}), None))
    np.testing.assert_allclose(result.outputs["logits"], expected(X, 1), rtol=1e-5, atol=1e-5)
