"""Hot swap: a new version published under continuous load is verified, loaded, warmed and
swapped in with zero failed requests; a version that fails verification is skipped and the old one
keeps serving."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving_helpers import IN_FEATURES, classifier_weights, publish_classifier, running_server

from serving.api import create_app
from serving.dataplane import DataPlane
from serving.registry import ModelRegistry
from serving.repository import ModelRepository
from serving.settings import ServingConfig
from serving.watcher import RepositoryWatcher


def expected(x: np.ndarray, seed: int) -> np.ndarray:
    w, b = classifier_weights(seed)
    return x @ w + b


def test_hot_swap_under_load_fails_no_request(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo")
    publish_classifier(repo, tmp_path, seed=1)
    registry = ModelRegistry()
    # config.pbtxt's version policy (latest 1) decides: v1 is unloaded once v2 serves
    watcher = RepositoryWatcher(
        repo, registry, ServingConfig(instances=2, providers="cpu"), poll_interval_s=0.05
    )
    watcher.start()
    old_pool = registry.get("clf")
    app = create_app(DataPlane(registry, ready=lambda: watcher.ready))
    x = np.random.default_rng(0).random((2, IN_FEATURES), dtype=np.float32)
    body = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": x.ravel().tolist()}]
    }
    seen: list[str] = []
    failures: list[str] = []
    stop = threading.Event()

    def load(url: str) -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    r = client.post(f"{url}/v2/models/clf/infer", json=body)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                    continue
                doc = r.json()
                version = doc["model_version"]
                got = np.array(doc["outputs"][0]["data"], np.float32).reshape(2, 3)
                if not np.allclose(got, expected(x, int(version)), rtol=1e-5, atol=1e-4):
                    failures.append(f"wrong output for version {version}")
                seen.append(version)

    try:
        with running_server(app) as url:
            threads = [threading.Thread(target=load, args=(url,)) for _ in range(3)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 15  # wait for answers, not for a time: CPUs are shared
            while len(seen) <= 10 and not failures and time.monotonic() < deadline:
                time.sleep(0.02)
            before = len(seen)
            publish_classifier(repo, tmp_path, seed=2)
            deadline = time.monotonic() + 15
            while "2" not in seen[before:] and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.3)  # keep the load on after the swap
            stop.set()
            for t in threads:
                t.join(15)
    finally:
        stop.set()
        watcher.stop()
    assert failures == []
    assert before > 10 and "2" in seen, (before, seen[-5:])
    first_new = seen.index("2")
    assert set(seen[:first_new]) == {"1"}
    # requests of the three clients interleave, so a few v1 answers may trail the first v2 one
    assert seen[first_new + 10 :].count("1") == 0
    assert old_pool.closed and all(w.join(0) for w in old_pool.workers)
    assert watcher.swaps >= 1


def test_unverifiable_version_is_skipped_old_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = ModelRepository(tmp_path / "repo")
    publish_classifier(repo, tmp_path, seed=1)
    registry = ModelRegistry()
    watcher = RepositoryWatcher(repo, registry, ServingConfig(instances=1, providers="cpu"))
    watcher.poll_once()
    v2 = publish_classifier(repo, tmp_path, seed=2)
    model_file = repo.model_path("clf", v2)
    model_file.write_bytes(model_file.read_bytes() + b"tampered")  # checksum no longer matches
    with caplog.at_level(logging.ERROR, logger="serving.watcher"):
        watcher.poll_once()
    try:
        assert registry.get("clf").version == 1
        assert ("clf", v2) in watcher.failed and "checksum mismatch" in watcher.failed[("clf", v2)]
        assert "skipping clf version 2" in caplog.text
        assert repo.leased_versions("clf") == {1}  # the failed version's lease was released
        x = np.ones((1, IN_FEATURES), np.float32)
        np.testing.assert_allclose(
            registry.get("clf").infer({"x": x})["logits"], expected(x, 1), rtol=1e-5, atol=1e-4
        )
        v3 = publish_classifier(repo, tmp_path, seed=3)  # a good one after the bad one
        watcher.poll_once()
        assert registry.get("clf").version == v3 and registry.models() == {"clf": [v3]}
        assert repo.leased_versions("clf") == {v3}
    finally:
        watcher.stop()
    assert repo.leased_versions("clf") == set()


def _chunk(doc: dict) -> bytes:
    line = json.dumps(doc).encode() + b"\n"
    return b"%x\r\n%s\r\n" % (len(line), line)


def _read_until(sock: socket.socket, received: bytes, needle: bytes) -> bytes:
    while needle not in received:
        data = sock.recv(65536)
        assert data, "connection closed early"
        received += data
    return received


def test_open_stream_follows_the_newest_version(tmp_path: Path) -> None:
    """A line is answered by the newest version loaded when it is read, as a single infer is: an
    infer_stream opened before a swap answers later lines from the new version (before, a stream
    kept the pool it started with for as long as that version stayed loaded)."""
    repo = ModelRepository(tmp_path / "repo")
    publish_classifier(repo, tmp_path, seed=1)
    registry = ModelRegistry()
    watcher = RepositoryWatcher(  # keeps the newest two: version 1 stays loaded after the swap
        repo,
        registry,
        ServingConfig(instances=1, providers="cpu"),
        poll_interval_s=0.05,
        versions=2,
    )
    watcher.start()
    app = create_app(DataPlane(registry, ready=lambda: watcher.ready))
    tensor = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
    try:
        with running_server(app) as url:
            host, port = url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(
                    b"POST /v2/models/clf/infer_stream HTTP/1.1\r\nHost: x\r\n"
                    b"Transfer-Encoding: chunked\r\nContent-Type: application/x-ndjson\r\n\r\n"
                )
                sock.sendall(_chunk({"id": "a", "inputs": [tensor]}))
                received = _read_until(sock, b"", b'"id":"a"')
                publish_classifier(repo, tmp_path, seed=2)
                deadline = time.monotonic() + 15
                while registry.get("clf").version != 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
                assert registry.models() == {"clf": [1, 2]}
                sock.sendall(_chunk({"id": "b", "inputs": [tensor]}))
                received = _read_until(sock, received, b'"id":"b"')
                sock.sendall(b"0\r\n\r\n")
    finally:
        watcher.stop()
    docs = [
        json.loads(line)
        for line in received.split(b"\r\n")
        if line.startswith(b"{") and b"model_name" in line
    ]
    assert [(d["id"], d["model_version"]) for d in docs] == [("a", "1"), ("b", "2")]
