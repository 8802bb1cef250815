"""The HTTP front end under hostile or unlucky input (issue 14): a bug is one 500 on a connection
that stays open, idle and half-sent connections are closed, the connection limit and the Host check
hold, one big JSON body stalls nobody else, NDJSON lines are split in linear time, and /metrics
forgets unloaded versions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from serving_helpers import make_classifier, publish_classifier, running_frontends

from serving.api import ApiSettings, create_app
from serving.dataplane import DataPlane
from serving.http_server import listen_socket
from serving.json_offload import JsonDecoder
from serving.ndjson_stream import LineSplitter
from serving.pool import EnginePool
from serving.registry import ModelRegistry
from serving.repository import ModelRepository
from serving.settings import ServingConfig
from serving.signature import ModelSignature
from serving.tensor_spec import TensorSpec
from serving.watcher import RepositoryWatcher

BODY = json.dumps(
    {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
).encode()


class Served:
    def __init__(self, url: str, dataplane: DataPlane) -> None:
        self.url = url
        self.host, port = url.removeprefix("http://").split(":")
        self.port = int(port)
        self.dataplane = dataplane


@contextlib.contextmanager
def serve(tmp: Path, **overrides: Any) -> Iterator[Served]:
    repo = ModelRepository(tmp / "repo")
    publish_classifier(repo, tmp, seed=1)
    registry = ModelRegistry()
    settings = ServingConfig(instances=1, providers="cpu", **overrides)
    watcher = RepositoryWatcher(repo, registry, settings, poll_interval_s=0.1)
    watcher.start()
    dataplane = DataPlane(registry, ready=lambda: watcher.ready)
    decoder = JsonDecoder(settings.json_offload_bytes, settings.json_offload_processes)
    app = create_app(dataplane, settings=ApiSettings.from_config(settings, None), decoder=decoder)
    try:
        with running_frontends(dataplane, app, serving=settings) as (url, _):
            yield Served(url, dataplane)
    finally:
        watcher.stop()
        decoder.close()


def _request(path: str, body: bytes, host: str = "localhost") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP/1.1 response (Content-Length framed) from ``sock``: status and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a response"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":", 1)[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
    )
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split(b" ", 2)[1]), rest[:length]


# ---------------------------------------------------------------- errors keep the connection


def test_bad_input_and_a_bug_keep_the_connection_open(tmp_path: Path) -> None:
    with serve(tmp_path) as s:
        real_infer = s.dataplane.infer
        calls = {"n": 0}

        async def buggy_once(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise ZeroDivisionError("simulated bug")
            return await real_infer(*args, **kwargs)

        s.dataplane.infer = buggy_once  # type: ignore[method-assign]
        bad = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
        bad["outputs"] = [{"name": "logits", "parameters": 5}]  # type: ignore[list-item]
        with socket.create_connection((s.host, s.port), timeout=10) as sock:
            sock.sendall(_request("/v2/models/clf/infer", BODY))
            status, body = _read_response(sock)
            assert status == 500 and "ZeroDivisionError: simulated bug" in json.loads(body)["error"]
            sock.sendall(_request("/v2/models/clf/infer", json.dumps(bad).encode()))
            status, body = _read_response(sock)
            assert (
                status == 400 and "'parameters' must be a JSON object" in json.loads(body)["error"]
            )
            sock.sendall(_request("/v2/models/clf/infer", b'{"inputs": ' + b"[" * 5000 + b"]"))
            status, body = _read_response(sock)
            assert status == 400
            sock.sendall(_request("/v2/models/clf/infer", BODY))  # same connection, still served
            status, body = _read_response(sock)
            assert status == 200 and json.loads(body)["model_version"] == "1"


# ---------------------------------------------------------------- connections


def test_idle_and_half_sent_connections_are_closed(tmp_path: Path) -> None:
    with serve(tmp_path, header_timeout_s=0.3, keep_alive_timeout_s=0.3) as s:
        idle = socket.create_connection((s.host, s.port), timeout=10)
        half = socket.create_connection((s.host, s.port), timeout=10)
        half.sendall(b"POST /v2/models/clf/infer HTTP/1.1\r\nHost: x\r\n")  # no end of headers
        used = socket.create_connection((s.host, s.port), timeout=10)
        used.sendall(_request("/v2/models/clf/infer", BODY))
        assert _read_response(used)[0] == 200  # then idle in keep-alive
        for sock in (idle, half, used):
            with sock:
                assert sock.recv(1) == b""  # the server closed it (recv would time out if not)


def test_connection_limit_answers_503(tmp_path: Path) -> None:
    with serve(tmp_path, max_connections=2) as s:
        holders = [socket.create_connection((s.host, s.port), timeout=10) for _ in range(2)]
        try:
            time.sleep(0.2)  # let the server register both connections
            r = httpx.post(s.url + "/v2/models/clf/infer", content=BODY)
            assert r.status_code == 503
        finally:
            for sock in holders:
                sock.close()
        deadline = time.monotonic() + 10
        while httpx.post(s.url + "/v2/models/clf/infer", content=BODY).status_code != 200:
            assert time.monotonic() < deadline


def test_allowed_hosts(tmp_path: Path) -> None:
    with serve(tmp_path, allowed_hosts=["localhost", "127.0.0.1"]) as s:
        ok = httpx.post(s.url + "/v2/models/clf/infer", content=BODY)  # Host: 127.0.0.1:port
        assert ok.status_code == 200
        r = httpx.post(
            s.url + "/v2/models/clf/infer", content=BODY, headers={"Host": "evil.example:80"}
        )
        assert r.status_code == 400
        assert "Host header 'evil.example:80' is not allowed" in r.json()["error"]


# ---------------------------------------------------------------- big bodies


def test_a_big_json_body_does_not_stall_small_requests(tmp_path: Path) -> None:
    """Small requests sent once a ~40 MB JSON body has been received are all answered before the
    big one (before the fix its decode held the event loop for a second: the big answer came
    first and every small one waited for it)."""
    with serve(tmp_path, json_offload_bytes=1 << 20, body_limit_bytes=1 << 28) as s:
        rows = 700_000
        x = np.random.default_rng(0).random((rows, 4), dtype=np.float32).round(6)
        big = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [rows, 4], "data": []}]}
        big["inputs"][0]["data"] = x.ravel().tolist()
        big_body = json.dumps(big).encode()
        assert len(big_body) > 35 << 20
        url = s.url + "/v2/models/clf/infer"
        with httpx.Client(timeout=60) as client:
            client.post(url, content=big_body)  # the decoder process is started
            with socket.create_connection((s.host, s.port), timeout=60) as big_sock:
                big_sock.sendall(_request("/v2/models/clf/infer", big_body))
                # sendall returned: all but the socket buffers' worth is read; decoding starts
                for _ in range(5):
                    assert client.post(url, content=BODY).status_code == 200
                answered_first, _, _ = select.select([big_sock], [], [], 0)
                assert not answered_first, "the big request was answered before the small ones"
                status, body = _read_response(big_sock)
        assert status == 400  # 700,000 rows is over max_batch_size: it was decoded
        assert "batch size 700000 is outside 1..64" in json.loads(body)["error"]


def test_line_splitter_joins_each_line_once() -> None:
    splitter = LineSplitter(limit=1 << 30)
    line = b"x" * (16 << 20)
    chunks = [line[i : i + 4096] for i in range(0, len(line), 4096)]
    out = []
    for chunk in chunks:
        out += splitter.feed(chunk)
    out += splitter.feed(b"\nab\ncd", final=False)
    out += splitter.feed(b"e", final=True)
    assert out == [line, b"ab", b"cde"]


def test_line_splitter_stops_at_an_over_limit_line() -> None:
    splitter = LineSplitter(limit=10)
    assert splitter.feed(b"short\n0123456") == [b"short"]
    assert splitter.overflow is None
    assert splitter.feed(b"789abc") == []
    assert splitter.overflow == b"0123456789abc"


# ---------------------------------------------------------------- metrics


def test_metrics_forget_unloaded_versions(tmp_path: Path) -> None:
    """After 300 versions came and went /metrics holds the loaded one only (before: 38 series
    per version ever loaded)."""
    signature = ModelSignature.build(
        [TensorSpec("x", "FP32", (-1, 4))], [TensorSpec("logits", "FP32", (-1, 3))], 64
    )
    path = make_classifier(tmp_path / "clf.onnx")
    settings = ServingConfig(instances=1, providers="cpu", warmup=False, run_timeout_s=0)
    registry = ModelRegistry()
    dataplane = DataPlane(registry)
    sizes = []
    previous = None
    for version in range(1, 301):
        pool = EnginePool("clf", version, path, signature, settings)
        registry.add(pool)
        if previous is not None:
            registry.remove("clf", previous.version)
            previous.close(1)
        previous = pool
        dataplane.metrics.observe("clf", version, 0.001, 0.0001)
        dataplane.record_failure("clf", 400)
        dataplane.record_failure(f"junk-{version}", 404)
        if version in (1, 300):
            sizes.append(len(dataplane.metrics.render()))
    previous.close(1)
    text = dataplane.metrics.render().decode()
    assert 'version="300"' in text and 'version="299"' not in text
    assert "junk-" not in text
    assert sizes[1] <= sizes[0] + 200, sizes  # the same series, only bigger numbers


def test_connections_accepted_on_the_http_socket_have_nagle_turned_off() -> None:
    # what uvicorn does with fedserve-serve's socket, on asyncio's own loop (not uvloop)
    sock = listen_socket("127.0.0.1", 0)

    async def accept_one() -> int:
        accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()
        server = await asyncio.start_server(lambda _r, w: accepted.set_result(w), sock=sock)
        async with server:
            _, client = await asyncio.open_connection(*sock.getsockname()[:2])
            writer = await asyncio.wait_for(accepted, 10)
            nodelay = writer.get_extra_info("socket").getsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY
            )
            client.close()
            writer.close()
            return int(nodelay)

    assert asyncio.run(accept_one()) != 0
