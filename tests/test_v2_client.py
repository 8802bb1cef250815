"""serving/v2_client.py against our codec and a real server: JSON and binary tensors, health,
metadata, errors, readiness, auth."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from serving_helpers import (
    CLASSES,
    IN_FEATURES,
    classifier_weights,
    publish_classifier,
    running_server,
)

from server.processes import free_port
from serving.api import ApiSettings, create_app
from serving.dataplane import DataPlane
from serving.protocol import decode_request, encode_response
from serving.registry import ModelRegistry
from serving.repository import ModelRepository
from serving.settings import ServingConfig
from serving.v2_client import V2Client, V2Error, decode_response, encode_request
from serving.watcher import RepositoryWatcher

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Version 1 of classifier ``clf`` served twice: openly and behind a bearer token."""
    tmp = tmp_path_factory.mktemp("v2client")
    repo = ModelRepository(tmp / "repo")
    publish_classifier(repo, tmp, seed=1)
    watcher = RepositoryWatcher(
        repo, ModelRegistry(), ServingConfig(instances=1, providers="cpu"), poll_interval_s=0.1
    )
    watcher.start()
    ready = lambda: watcher.ready  # noqa: E731
    try:
        with (
            running_server(create_app(DataPlane(watcher.registry, ready=ready))) as url,
            running_server(
                create_app(
                    DataPlane(watcher.registry, ready=ready), settings=ApiSettings(token=TOKEN)
                )
            ) as guarded,
        ):
            yield url, guarded
    finally:
        watcher.stop()


@pytest.fixture
def client(urls: tuple[str, str]) -> Iterator[V2Client]:
    with V2Client(urls[0]) as c:
        c.wait_until_ready(model="clf", timeout=30)
        yield c


def expected(x: np.ndarray) -> np.ndarray:
    w, b = classifier_weights(1)
    return x @ w + b


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_returns_the_models_outputs_as_numpy(client: V2Client, binary: bool) -> None:
    x = np.random.default_rng(0).standard_normal((5, IN_FEATURES)).astype(np.float32)
    result = client.infer("clf", {"x": x}, ["logits"], binary=binary, request_id="r1")
    assert (result.model_name, result.model_version, result.id) == ("clf", "1", "r1")
    logits = result.outputs["logits"]
    assert logits.dtype == np.float32 and logits.shape == (5, CLASSES)
    np.testing.assert_allclose(logits, expected(x), rtol=1e-5, atol=1e-5)
    by_version = client.infer("clf", {"x": x}, version=1, binary=binary)  # all outputs
    np.testing.assert_array_equal(by_version.outputs["logits"], logits)


def test_health_and_metadata(client: V2Client) -> None:
    assert client.live() and client.ready()
    assert client.model_ready("clf") and client.model_ready("clf", 1)
    assert not client.model_ready("clf", 9)
    assert client.server_metadata()["name"]
    meta = client.model_metadata("clf")
    assert meta["name"] == "clf" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, IN_FEATURES]}]


def test_an_error_answer_raises_with_the_servers_message(client: V2Client) -> None:
    x = np.zeros((1, IN_FEATURES), np.float32)
    with pytest.raises(V2Error, match="unknown model 'nope'") as err:
        client.infer("nope", {"x": x})
    assert err.value.status == 404
    with pytest.raises(V2Error) as err:
        client.infer("clf", {"x": np.zeros((1, IN_FEATURES + 1), np.float32)})
    assert err.value.status == 400 and "shape [1, 5]" in err.value.message
    assert client.infer("clf", {"x": x}).model_version == "1"  # the connection is still usable


def test_a_token_is_sent_as_bearer(urls: tuple[str, str]) -> None:
    x = np.zeros((2, IN_FEATURES), np.float32)
    with V2Client(urls[1]) as anonymous, pytest.raises(V2Error) as err:
        anonymous.infer("clf", {"x": x})
    assert err.value.status == 401
    with V2Client(urls[1], token=TOKEN) as authorized:
        assert authorized.infer("clf", {"x": x}).outputs["logits"].shape == (2, CLASSES)


def test_wait_until_ready_gives_up_on_a_dead_server_or_after_the_timeout() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(4)"])
    dead.wait(30)
    with V2Client(f"127.0.0.1:{free_port()}") as nobody:
        with pytest.raises(RuntimeError, match="exited with 4 before it was ready"):
            nobody.wait_until_ready(timeout=30, process=dead)
        with pytest.raises(TimeoutError, match="not ready within 0.2 s"):
            nobody.wait_until_ready(timeout=0.2)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_the_codec_round_trips_through_the_servers_codec(binary: bool) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    ids = np.array([[1], [2], [3]], dtype=np.int64)
    body, header_length = encode_request({"x": x, "ids": ids}, ["y"], binary=binary)
    assert (header_length is None) == (not binary)
    request = decode_request(body, header_length)
    np.testing.assert_array_equal(request.inputs["x"], x)
    np.testing.assert_array_equal(request.inputs["ids"], ids)
    assert request.outputs == [("y", binary)]
    y = (x * 2).astype(np.float64)
    answer, answer_length = encode_response("m", "3", {"y": y}, ["y"], request)
    result = decode_response(answer, answer_length)
    assert (result.model_name, result.model_version) == ("m", "3")
    assert result.outputs["y"].dtype == np.float64
    np.testing.assert_array_equal(result.outputs["y"], y)


def test_a_tensor_without_a_numeric_v2_datatype_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="input 'words': numpy dtype <U1 has no numeric"):
        encode_request({"words": np.array(["a", "b"])})


def test_a_bad_address_is_refused() -> None:
    with pytest.raises(ValueError, match="host:port or http://host:port, got 'localhost'"):
        V2Client("localhost")


def test_the_module_needs_no_torch_flwr_task_or_server() -> None:
    code = (
        "import sys; import serving.v2_client; "
        "print(sorted(m for m in ('torch', 'flwr', 'task', 'server', 'onnxruntime') "
        "if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
