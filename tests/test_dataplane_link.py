"""The link between a front-end process and the engine process's dataplane
(serving.dataplane_link): what crosses it comes back the same, errors keep their class, status
and headers, and a link that goes away fails its calls with 503 instead of hanging them."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from serving_helpers import IN_FEATURES, linked

from serving.dataplane import DataPlane
from serving.dataplane_link import (
    LinkError,
    pack_request,
    pack_result,
    rebuild_error,
    unpack_request,
    unpack_result,
)
from serving.errors import NotFound, Overloaded, ServingError, Unavailable
from serving.inference import InferRequest, InferResult
from serving.registry import ModelRegistry


def test_tensors_of_every_kind_cross_the_link_unchanged() -> None:
    inputs = {
        "f32": np.arange(12, dtype=np.float32).reshape(3, 4),
        "f16": np.ones((2, 1), np.float16),
        "scalar": np.array(7, np.int64),
        "empty": np.zeros((0, 5), np.uint8),
        "text": np.array([b"a", b"bc\x00"], dtype=object),
        "strided": np.arange(16, dtype=np.int32).reshape(4, 4)[:, ::2],
    }
    request = InferRequest(inputs, "id-1", [("y", True)], binary_output=True)
    back = unpack_request(pack_request(request))
    assert (back.id, back.outputs, back.binary_output) == ("id-1", [("y", True)], True)
    assert list(back.inputs) == list(inputs)
    for name, array in inputs.items():
        assert back.inputs[name].dtype == array.dtype and back.inputs[name].shape == array.shape
        np.testing.assert_array_equal(back.inputs[name], array)
    outputs = {"y": np.full((3, 2), 0.5, np.float32), "unused": np.zeros(3, np.float32)}
    result = InferResult("m", 3, "id-1", outputs, ["y"], 0.002)
    got = unpack_result(pack_result(result))
    assert (got.model_name, got.model_version, got.id, got.queue_seconds) == ("m", 3, "id-1", 0.002)
    assert got.output_names == ["y"] and list(got.outputs) == ["y"]  # only what is answered
    np.testing.assert_array_equal(got.outputs["y"], outputs["y"])


def test_an_error_is_rebuilt_as_its_own_class_with_status_and_headers() -> None:
    for error in (Overloaded("queues full", retry_after_s=2.5), NotFound("unknown model 'x'")):
        rebuilt = rebuild_error(type(error).__name__, error.message, error.headers)
        assert type(rebuilt) is type(error)
        assert (rebuilt.status, rebuilt.grpc_code, rebuilt.message, rebuilt.headers) == (
            error.status,
            error.grpc_code,
            error.message,
            error.headers,
        )
    assert type(rebuild_error("NoSuchError", "m", {})) is ServingError


def test_calls_through_the_link_answer_as_the_dataplane_does(make_pool) -> None:
    registry = ModelRegistry()
    registry.add(make_pool(1, seed=1))
    dataplane = DataPlane(registry)
    x = np.random.default_rng(0).random((2, IN_FEATURES), dtype=np.float32)

    async def both() -> None:
        async def decode(specs: object) -> InferRequest:
            return InferRequest({"x": x})

        with linked(dataplane) as remote:
            assert await remote.model_metadata("clf") == await dataplane.model_metadata("clf")
            assert await remote.server_metadata() == await dataplane.server_metadata()
            _, local = await dataplane.infer_with("clf", None, decode)
            _, far = await remote.infer_with("clf", None, decode)
            np.testing.assert_array_equal(far.outputs["logits"], local.outputs["logits"])
            assert (far.model_name, far.model_version) == ("clf", 1)
            with pytest.raises(NotFound, match="unknown model 'nope'"):
                await remote.infer_with("nope", None, decode)
            remote.record_success(far, 0.01)
            remote.record_failure("nope", 404)
            await remote.ready()  # a call after the notes: they were handled before it
        text = dataplane.metrics.render().decode()  # the notes were recorded in the dataplane
        assert 'fedserve_requests_total{model="clf",version="1"} 1.0' in text
        assert 'fedserve_request_failures_total{code="404",model="_unknown"} 1.0' in text

    asyncio.run(both())


def test_a_call_on_a_link_that_closes_fails_with_503_instead_of_hanging(make_pool) -> None:
    registry = ModelRegistry()
    registry.add(make_pool(1, seed=1))

    async def call_after_close() -> None:
        with linked(DataPlane(registry)) as remote:
            assert await remote.ready()
        await asyncio.wait_for(remote.closed(), 10)
        with pytest.raises(Unavailable, match="the engine process is gone"):
            await asyncio.wait_for(remote.model_metadata("clf"), 10)

    asyncio.run(call_after_close())


def test_an_answer_that_cannot_be_sent_fails_its_call_instead_of_hanging_it() -> None:
    """The answer was pickled outside any handler: an unpicklable value killed the task that
    answered, and the front end's call waited forever."""

    class Plane:
        async def server_metadata(self) -> dict:
            return {"name": lambda: "not picklable"}

        async def ready(self) -> bool:
            return True

    async def call() -> None:
        with linked(Plane()) as remote:
            with pytest.raises(LinkError, match="could not be sent"):
                await asyncio.wait_for(remote.server_metadata(), 10)
            assert await asyncio.wait_for(remote.ready(), 10)  # the link goes on

    asyncio.run(call())
