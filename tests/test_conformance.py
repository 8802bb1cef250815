"""The same KServe v2 conformance checks through tritonclient.http and tritonclient.grpc against
fedserve-serve's two front ends (one event loop, as the CLI runs them): health, metadata, the
model config parsed as Triton's ModelConfig, inference (JSON, binary, raw, typed contents),
streaming, errors with their status codes and messages, statistics, model control; plus gRPC's
aio client and its bearer token."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tg
import tritonclient.grpc.aio as tga
import tritonclient.http as th
from google.protobuf import json_format
from serving_helpers import IN_FEATURES, linked, publish_classifier, running_frontends
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from serving.api import ApiSettings, create_app
from serving.dataplane import DataPlane
from serving.registry import ModelRegistry
from serving.repository import ModelRepository
from serving.settings import ServingConfig
from serving.watcher import RepositoryWatcher

TOKEN = "s3cret"


class Served:
    def __init__(self, http_url: str, grpc_address: str, repo: ModelRepository) -> None:
        self.http_url = http_url
        self.grpc_address = grpc_address
        self.repo = repo

    def client(self, protocol: str, **kwargs: Any) -> Any:
        if protocol == "http":
            return th.InferenceServerClient(self.http_url.removeprefix("http://"), **kwargs)
        return tg.InferenceServerClient(self.grpc_address, **kwargs)

    def reference(self, x: np.ndarray) -> np.ndarray:
        session = ort.InferenceSession(
            str(self.repo.model_path("clf", 1)), providers=["CPUExecutionProvider"]
        )
        return session.run(None, {"x": x})[0]


@contextlib.contextmanager
def serve(tmp: Path, token: str | None = None, *, through_link: bool = False) -> Iterator[Served]:
    """The front ends over the dataplane, or (``through_link``) over a RemoteDataPlane on a link
    to it, as a front-end process serves them (``serving.frontends > 1``)."""
    repo = ModelRepository(tmp / "repo")
    publish_classifier(repo, tmp, seed=1)
    registry = ModelRegistry()
    settings = ServingConfig(instances=2, providers="cpu", body_limit_bytes=1 << 20)
    watcher = RepositoryWatcher(repo, registry, settings, poll_interval_s=0.1)
    watcher.start()
    dataplane = DataPlane(registry, ready=lambda: watcher.ready, scheduler=watcher.scheduler)
    try:
        with contextlib.ExitStack() as stack:
            front = stack.enter_context(linked(dataplane)) if through_link else dataplane
            app = create_app(front, settings=ApiSettings.from_config(settings, token))
            http, grpc_addr = stack.enter_context(
                running_frontends(front, app, token=token, serving=settings)
            )
            yield Served(http, grpc_addr, repo)
    finally:
        watcher.stop()


@pytest.fixture(scope="module", params=["engine process", "front-end process"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    through_link = request.param == "front-end process"
    with serve(tmp_path_factory.mktemp("conformance"), through_link=through_link) as s:
        yield s


PROTOCOLS = ["http", "grpc"]
X = np.random.default_rng(0).random((5, IN_FEATURES), dtype=np.float32)


def infer_input(protocol: str, x: np.ndarray, binary: bool = True) -> Any:
    if protocol == "http":
        inp = th.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
    else:
        inp = tg.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
    return inp


def requested(protocol: str, binary: bool = True) -> Any:
    if protocol == "http":
        return th.InferRequestedOutput("logits", binary_data=binary)
    return tg.InferRequestedOutput("logits")


# ---------------------------------------------------------------- health, metadata, config


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_health(served: Served, protocol: str) -> None:
    c = served.client(protocol)
    assert c.is_server_live() and c.is_server_ready()
    assert c.is_model_ready("clf") and c.is_model_ready("clf", "1")
    assert not c.is_model_ready("nope")
    assert not c.is_model_ready("clf", "9")


def _as_dict(protocol: str, answer: Any) -> dict[str, Any]:
    if protocol == "http":
        return answer
    return json_format.MessageToDict(answer, preserving_proto_field_name=True)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_metadata(served: Served, protocol: str) -> None:
    c = served.client(protocol)
    server = _as_dict(protocol, c.get_server_metadata())
    assert server["name"] == "fedserve" and "binary_tensor_data" in server["extensions"]
    meta = _as_dict(protocol, c.get_model_metadata("clf"))
    assert meta["name"] == "clf" and meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    # proto3 JSON writes int64 as strings; parse both through the message to compare
    parsed = json_format.ParseDict(meta, service_pb2.ModelMetadataResponse())
    assert [(t.name, t.datatype, list(t.shape)) for t in parsed.inputs] == [
        ("x", "FP32", [-1, IN_FEATURES])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in parsed.outputs] == [
        ("logits", "FP32", [-1, 3])
    ]


def test_config_is_a_triton_model_config_on_both(served: Served) -> None:
    doc = served.client("http").get_model_config("clf")
    via_http = json_format.ParseDict(doc, model_config_pb2.ModelConfig())  # strict: no extras
    via_grpc = served.client("grpc").get_model_config("clf").config
    assert via_http == via_grpc
    assert via_grpc.max_batch_size == 64 and list(via_grpc.input[0].dims) == [IN_FEATURES]
    assert via_grpc.input[0].data_type == model_config_pb2.TYPE_FP32
    assert via_grpc.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_repository_index(served: Served, protocol: str) -> None:
    index = served.client(protocol).get_model_repository_index()
    models = index if protocol == "http" else _as_dict(protocol, index)["models"]
    assert [(m["name"], m["version"], m["state"]) for m in models] == [("clf", "1", "READY")]


# ---------------------------------------------------------------- inference


@pytest.mark.parametrize("protocol,binary", [("http", False), ("http", True), ("grpc", True)])
def test_infer_matches_onnxruntime(served: Served, protocol: str, binary: bool) -> None:
    c = served.client(protocol)
    ref = served.reference(X)
    result = c.infer(
        "clf",
        [infer_input(protocol, X, binary)],
        outputs=[requested(protocol, binary)],
        request_id="abc",
    )
    np.testing.assert_allclose(result.as_numpy("logits"), ref, rtol=1e-6, atol=1e-6)
    response = _as_dict(protocol, result.get_response())
    assert response["model_version"] == "1" and response["id"] == "abc"
    # no outputs named: every output
    result = c.infer("clf", [infer_input(protocol, X, binary)], model_version="1")
    np.testing.assert_allclose(result.as_numpy("logits"), ref, rtol=1e-6, atol=1e-6)


def test_grpc_typed_contents_and_raw(served: Served) -> None:
    """ModelInfer with typed ``fp32_contents`` and with ``raw_input_contents``: one answer."""
    ref = served.reference(X)
    with grpc.insecure_channel(served.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        typed = service_pb2.ModelInferRequest(model_name="clf", id="t")
        typed.inputs.add(name="x", datatype="FP32", shape=X.shape).contents.fp32_contents.extend(
            X.ravel().tolist()
        )
        raw = service_pb2.ModelInferRequest(model_name="clf", id="r")
        raw.inputs.add(name="x", datatype="FP32", shape=X.shape)
        raw.raw_input_contents.append(X.tobytes())
        for request in (typed, raw):
            response = stub.ModelInfer(request)
            assert response.id == request.id and response.model_version == "1"
            (out,) = response.outputs
            assert (out.name, out.datatype, list(out.shape)) == ("logits", "FP32", [5, 3])
            got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(5, 3)
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_grpc_aio_client(served: Served) -> None:
    async def main() -> tuple[bool, list[np.ndarray]]:
        async with tga.InferenceServerClient(served.grpc_address) as c:
            ready = await c.is_model_ready("clf")
            results = await asyncio.gather(
                *(c.infer("clf", [infer_input("grpc", X[i : i + 1])]) for i in range(5))
            )
            return ready, [r.as_numpy("logits") for r in results]

    ready, outs = asyncio.run(main())
    assert ready
    np.testing.assert_allclose(np.concatenate(outs), served.reference(X), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- streaming


def test_grpc_stream_answers_every_request_by_id(served: Served) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    c = served.client("grpc")
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for i in range(20):
            x = X[i % 5 : i % 5 + 1] if i != 7 else np.ones((1, 3), np.float32)
            inp = tg.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            c.async_stream_infer("clf", [inp], request_id=str(i))
        got = [answers.get(timeout=10) for _ in range(20)]
    finally:
        c.stop_stream()
    ref = served.reference(X)
    by_id = {}
    errors = []
    for result, error in got:
        if error is not None:
            errors.append(error)
        else:
            by_id[result.get_response().id] = result.as_numpy("logits")
    assert len(errors) == 1 and "input 'x': shape [1, 3] does not match" in errors[0].message()
    assert sorted(by_id, key=int) == [str(i) for i in range(20) if i != 7]
    for i, logits in by_id.items():
        k = int(i) % 5
        np.testing.assert_allclose(logits, ref[k : k + 1], rtol=1e-6, atol=1e-6)


def test_http_stream_answers_in_order(served: Served) -> None:
    lines = [
        json.dumps(
            {
                "id": str(i),
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": X[i].tolist()}
                ],
            }
        )
        for i in range(5)
    ]
    r = httpx.post(served.http_url + "/v2/models/clf/infer_stream", content="\n".join(lines))
    docs = [json.loads(line) for line in r.text.splitlines()]
    assert [d["id"] for d in docs] == [str(i) for i in range(5)]
    got = np.array([d["outputs"][0]["data"] for d in docs], np.float32)
    np.testing.assert_allclose(got, served.reference(X), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- errors

ERRORS = {
    # case: (model, version, x, HTTP status, gRPC code, message fragment)
    "unknown model": ("nope", "", X, 404, "NOT_FOUND", "unknown model 'nope'"),
    "unknown version": ("clf", "9", X, 404, "NOT_FOUND", "of model 'clf'"),
    "wrong shape": (
        "clf",
        "",
        np.ones((1, 5), np.float32),
        400,
        "INVALID_ARGUMENT",
        "input 'x': shape [1, 5] does not match the model's x: FP32 [-1, 4]",
    ),
    "NaN": (
        "clf",
        "",
        np.full((1, 4), np.nan, np.float32),
        400,
        "INVALID_ARGUMENT",
        "input 'x': contains NaN or Inf",
    ),
    "batch over max": (
        "clf",
        "",
        np.zeros((65, 4), np.float32),
        400,
        "INVALID_ARGUMENT",
        "batch size 65 is outside 1..64",
    ),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_same_message_matching_status(served: Served, case: str) -> None:
    model, version, x, status, code, needle = ERRORS[case]
    messages = {}
    for protocol in PROTOCOLS:
        with pytest.raises(InferenceServerException) as info:
            served.client(protocol).infer(model, [infer_input(protocol, x)], model_version=version)
        messages[protocol] = info.value.message()
        expected_status = str(status) if protocol == "http" else f"StatusCode.{code}"
        assert info.value.status() == expected_status, (protocol, info.value)
        assert needle in info.value.message(), (protocol, info.value.message())
    assert messages["http"] == messages["grpc"]


def test_a_body_that_does_not_decode_is_answered_as_by_the_engine_process(served: Served) -> None:
    """A front-end process decodes without the model's specs: a body that does not decode is
    decoded again with them, so its message names what the model expects, and an unknown model
    is a 404 before its body's error, as in the engine process."""
    bad = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3]}]}
    expects = "(model expects x: FP32 [-1, 4])"
    r = httpx.post(served.http_url + "/v2/models/clf/infer", json=bad)
    assert r.status_code == 400 and expects in r.json()["error"], r.text
    r = httpx.post(served.http_url + "/v2/models/nope/infer", json=bad)
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"], r.text
    body = json.dumps(bad).encode()  # a body that cannot be read: its error, read once
    headers = {"content-encoding": "br"}
    r = httpx.post(served.http_url + "/v2/models/clf/infer", content=body, headers=headers)
    assert r.status_code == 400 and "unsupported Content-Encoding 'br'" in r.text, r.text
    too_big = bytes(2 << 20)  # over this server's body limit (1 MiB)
    r = httpx.post(served.http_url + "/v2/models/clf/infer", content=too_big)
    assert r.status_code == 413, r.text
    r = httpx.post(served.http_url + "/v2/models/nope/infer", content=too_big)
    assert r.status_code == 404, r.text  # the model first, as in the engine process
    short = service_pb2.ModelInferRequest(model_name="clf", raw_input_contents=[bytes(12)])
    short.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    with grpc.insecure_channel(served.grpc_address) as channel:
        infer = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            infer(short, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expects in info.value.details(), info.value.details()


def test_grpc_message_over_the_limit_is_resource_exhausted(served: Served) -> None:
    big = np.zeros((64, (1 << 20) // 64 // 4 + 1), np.float32)  # > body_limit_bytes (1 MiB)
    with pytest.raises(InferenceServerException) as info:
        served.client("grpc").infer("clf", [infer_input("grpc", big)])
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"


def test_grpc_bad_raw_contents_is_invalid_argument(served: Served) -> None:
    with grpc.insecure_channel(served.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name="clf")
        request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(b"\0" * 12)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "raw_input_contents has 12 bytes but FP32 shape [1, 4] needs 16" in (
            info.value.details()
        )
        huge = service_pb2.ModelInferRequest(model_name="clf")
        huge.inputs.add(name="x", datatype="FP32", shape=[0, 2**62])
        huge.raw_input_contents.append(b"")
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(huge)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "larger than any tensor" in info.value.details()
        # the server is fine
        ok = service_pb2.ModelInferRequest(model_name="clf")
        ok.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        ok.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
        assert stub.ModelInfer(ok).model_version == "1"


@pytest.mark.parametrize("name", ["m" * 20_000, "模型" * 2_000])
def test_grpc_error_echoing_a_huge_name_is_still_its_status(served: Served, name: str) -> None:
    """A status message goes back percent-encoded in the grpc-message trailer; one echoing a
    20 000-character model name (or a big repository's list of models) exceeded the client's
    metadata limit, and the client saw a transport error (RESOURCE_EXHAUSTED "received metadata
    size exceeds hard limit") instead of NOT_FOUND. The message is now cut to fit."""
    with grpc.insecure_channel(served.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name=name)
        request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
        calls = [
            (stub.ModelInfer, request),
            (stub.RepositoryModelLoad, service_pb2.RepositoryModelLoadRequest(model_name=name)),
            (stub.ModelMetadata, service_pb2.ModelMetadataRequest(name=name)),
        ]
        for call, message in calls:
            with pytest.raises(grpc.RpcError) as info:
                call(message)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND, info.value.details()
            details = info.value.details()
            assert details.startswith(f"unknown model '{name[:100]}")
            assert details.endswith(" ... (truncated)")


def test_grpc_bytes_that_are_no_message_fail_only_their_own_request(served: Served) -> None:
    """A ModelInferRequest that does not parse: grpc's deserializer raised, so a unary call got
    UNKNOWN and a stream was ended there, every request after it unanswered. Now it is that
    request's INVALID_ARGUMENT (unary) or error response (stream), and the stream goes on."""
    good = service_pb2.ModelInferRequest(model_name="clf")
    good.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    good.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    garbage = b"\xff\xff\xff\x07garbage"
    service = "/inference.GRPCInferenceService"
    with grpc.insecure_channel(served.grpc_address) as channel:
        unary = channel.unary_unary(
            f"{service}/ModelInfer",
            request_serializer=bytes,
            response_deserializer=service_pb2.ModelInferResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as info:
            unary(garbage)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid inference.ModelInferRequest" in info.value.details()

        stream = channel.stream_stream(
            f"{service}/ModelStreamInfer",
            request_serializer=bytes,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        first, second = service_pb2.ModelInferRequest(), service_pb2.ModelInferRequest()
        first.CopyFrom(good)
        first.id = "before"
        second.CopyFrom(good)
        second.id = "after"
        sent = [first.SerializeToString(), garbage, second.SerializeToString()]
        answers = {r.infer_response.id: r.error_message for r in stream(iter(sent), timeout=30)}
    assert answers.keys() == {"before", "", "after"}
    assert answers["before"] == answers["after"] == ""
    assert "not a valid inference.ModelInferRequest" in answers[""]


def test_grpc_stream_stops_reading_a_client_that_reads_no_answers() -> None:
    """A stream's window was released when an answer was computed, not when it was sent: a
    client sending requests without reading the answers had every request taken and every
    answer queued in the server's memory. Now the stream takes at most STREAM_WINDOW requests
    beyond what it sent back, and flow control holds the client there."""
    from serving.grpc_server import STREAM_WINDOW, InferenceServicer

    servicer = InferenceServicer(DataPlane(ModelRegistry()))  # every request: NotFound at once
    taken = 0

    async def requests() -> Any:
        nonlocal taken
        for i in range(10 * STREAM_WINDOW):
            taken += 1
            yield service_pb2.ModelInferRequest(model_name="nope", id=str(i))

    async def a_client_that_reads_one_answer() -> tuple[Any, int]:
        answers = servicer.ModelStreamInfer(requests(), context=None)
        first = await answers.__anext__()
        for _ in range(100 * STREAM_WINDOW):  # let the reader and the requests run as far as
            await asyncio.sleep(0)  # they can: no I/O, no clock, only the loop's turns
        seen = taken
        await answers.aclose()
        return first, seen

    first, seen = asyncio.run(a_client_that_reads_one_answer())
    assert first.infer_response.id == "0" and "unknown model 'nope'" in first.error_message
    assert seen <= STREAM_WINDOW + 2, seen  # the one sent, the window, the one read ahead


# ---------------------------------------------------------------- auth


@pytest.mark.parametrize("through_link", [False, True])
def test_bearer_token_on_both(tmp_path: Path, through_link: bool) -> None:
    with serve(tmp_path, token=TOKEN, through_link=through_link) as s:
        for protocol in PROTOCOLS:
            c = s.client(protocol)
            assert c.is_server_live()  # the probes need no token, as over HTTP
            with pytest.raises(InferenceServerException) as info:
                c.get_model_metadata("clf")
            assert "bearer token" in info.value.message()
            status = "401" if protocol == "http" else "StatusCode.UNAUTHENTICATED"
            assert info.value.status() == status
            headers = {"authorization": f"Bearer {TOKEN}"}  # gRPC metadata keys are lower-case
            assert c.get_model_metadata("clf", headers=headers)
            result = c.infer("clf", [infer_input(protocol, X)], headers=headers)
            np.testing.assert_allclose(result.as_numpy("logits"), s.reference(X), atol=1e-6)


# ---------------------------------------------------------------- statistics, model control


def test_statistics_on_both(served: Served) -> None:
    for protocol in PROTOCOLS:
        c = served.client(protocol)
        c.infer("clf", [infer_input(protocol, X)])
        stats = _as_dict(protocol, c.get_inference_statistics("clf"))
        (entry,) = stats["model_stats"]
        assert entry["name"] == "clf" and entry["version"] == "1"
        success = entry["inference_stats"]["success"]
        assert int(success["count"]) >= 1 and int(success["ns"]) > 0
        assert int(entry["inference_count"]) >= 5 and int(entry["execution_count"]) >= 1
    with pytest.raises(InferenceServerException) as info:
        served.client("grpc").get_inference_statistics("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    text = httpx.get(served.http_url + "/metrics").text
    assert 'nv_inference_request_success{model="clf",version="1"}' in text


@pytest.mark.parametrize("through_link", [False, True])
def test_model_control_on_both(tmp_path: Path, through_link: bool) -> None:
    with serve(tmp_path, through_link=through_link) as s:
        for protocol in PROTOCOLS:
            c = s.client(protocol)
            c.unload_model("clf")
            assert not c.is_model_ready("clf")
            c.load_model("clf")
            assert c.is_model_ready("clf")
            with pytest.raises(InferenceServerException) as info:
                c.load_model("nope")
            status = "404" if protocol == "http" else "StatusCode.NOT_FOUND"
            assert info.value.status() == status and "nope" in info.value.message()
