"""The model repository on a model store, against a real S3-protocol server (moto's, on
127.0.0.1, behind a proxy the tests take down): publish commits a version by writing its manifest
last, half-written versions are never served, retention keeps leased versions, the server follows
what is published, and keeps serving while the store is away, then catches up."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from repository_helpers import make_onnx
from serving_helpers import IN_FEATURES, classifier_weights, make_classifier
from store_helpers import BUCKET, TcpProxy, fresh_s3fs, make_bucket, store_env

from benchmarks.storage.moto_s3 import moto_server
from server.processes import free_port
from serving.cli import serving_ready
from serving.dataplane import DataPlane
from serving.errors import RepositoryError, StoreError
from serving.inference import InferRequest
from serving.model_config import parse_config
from serving.registry import ModelRegistry
from serving.settings import ServingConfig
from serving.store import Store, StoreConfig
from serving.store_layout import MANIFEST_FILE
from serving.store_mirror import StoreMirror
from serving.store_repository import StoreRepository, open_repository
from serving.tensor_spec import TensorSpec
from serving.watcher import RepositoryWatcher


@pytest.fixture(scope="module")
def moto() -> Iterator[tuple[str, int]]:
    with moto_server() as address:
        yield address


@pytest.fixture
def proxy(moto, monkeypatch: pytest.MonkeyPatch) -> Iterator[TcpProxy]:
    proxy = TcpProxy(moto)
    for key, value in store_env(proxy.url).items():
        monkeypatch.setenv(key, value)
    make_bucket()
    try:
        yield proxy
    finally:
        proxy.down()
        fresh_s3fs()


@pytest.fixture
def url(proxy: TcpProxy) -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/repo"


def publish_clf(repo: StoreRepository, tmp: Path, seed: int, **metrics: float) -> int:
    src = make_classifier(tmp / f"clf-{seed}-{time.monotonic_ns()}.onnx", seed)
    return repo.publish(
        "clf",
        src,
        inputs=[TensorSpec("x", "FP32", [-1, IN_FEATURES])],
        outputs=[TensorSpec("logits", "FP32", [-1, 3])],
        metadata={"round": seed, "metrics": metrics},
        max_batch_size=8,
    )


def mirror_of(url: str, tmp: Path, **settings) -> StoreMirror:
    return StoreMirror(Store(url), StoreConfig(cache_dir=str(tmp / "cache"), **settings))


def keys(url: str) -> set[str]:
    return set(Store(url).listing())


# ---------------------------------------------------------------- publish


def test_publish_writes_triton_layout_with_manifest(url: str, tmp_path: Path) -> None:
    repo = open_repository(url)
    assert isinstance(repo, StoreRepository)
    assert publish_clf(repo, tmp_path, 1, test_acc=0.5) == 1
    assert publish_clf(repo, tmp_path, 2, test_acc=0.6) == 2
    assert keys(url) == {
        "clf/config.pbtxt",
        "clf/.fedserve_state.json",
        *(f"clf/{v}/{f}" for v in (1, 2) for f in ("model.onnx", "metadata.json", MANIFEST_FILE)),
    }
    store = Store(url)
    manifest = json.loads(store.read(f"clf/2/{MANIFEST_FILE}"))
    assert manifest["version"] == 2 and set(manifest["files"]) == {"model.onnx", "metadata.json"}
    model_bytes = store.read("clf/2/model.onnx")
    assert manifest["files"]["model.onnx"]["size"] == len(model_bytes)
    meta = repo.load_metadata("clf", 2)
    assert meta["version"] == 2 and meta["metrics"] == {"test_acc": 0.6}
    config = parse_config(store.read("clf/config.pbtxt").decode(), "config.pbtxt")
    assert config.name == "clf" and config.max_batch_size == 8
    assert repo.list_models() == ["clf"] and repo.list_versions("clf") == [1, 2]
    assert repo.best("clf", "test_acc") == 2


def test_interrupted_publish_is_never_served(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = StoreRepository(Store(url))
    publish_clf(repo, tmp_path, 1)
    # the publisher dies after every file is in place, before the manifest: no commit
    original = Store.write

    def crash_on_manifest(self: Store, key: str, data: bytes) -> None:
        if key.endswith(MANIFEST_FILE):
            raise KeyboardInterrupt("killed")
        original(self, key, data)

    monkeypatch.setattr(Store, "write", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        publish_clf(repo, tmp_path, 2)
    monkeypatch.undo()
    # and a second publisher crashed leaving files under a version number, no manifest
    store = Store(url)
    store.write("clf/3/model.onnx", b"half a model")
    assert repo.list_versions("clf") == [1]
    mirror = mirror_of(url, tmp_path)
    try:
        assert mirror.sync()
        assert mirror.cache.list_versions("clf") == [1]
        assert publish_clf(repo, tmp_path, 4) == 4  # numbers are never reused
        assert mirror.sync() and mirror.cache.list_versions("clf") == [1, 4]
    finally:
        mirror.stop()


def test_version_failing_its_checksums_is_skipped(
    url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = StoreRepository(Store(url))
    publish_clf(repo, tmp_path, 1)
    publish_clf(repo, tmp_path, 2)
    store = Store(url)
    store.write("clf/2/model.onnx", store.read("clf/2/model.onnx")[:-1] + b"\x00")
    mirror = mirror_of(url, tmp_path)
    try:
        with caplog.at_level(logging.ERROR, logger="serving.store_mirror"):
            assert mirror.sync()
        assert "skipping clf version 2" in caplog.text and "sha256" in caplog.text
        assert mirror.cache.list_versions("clf") == [1]  # the next newest instead
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="serving.store_mirror"):
            assert mirror.sync()
        assert caplog.text == ""  # not downloaded again until its manifest changes
    finally:
        mirror.stop()


def test_a_version_listed_before_its_manifest_is_served_once_committed(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server lists the store while a version's files are in place and its manifest is not
    written yet; once it is, the next sync serves that version (a stale listing cache used to
    hide the manifest from every later read: "file not found" for good)."""
    trainer = StoreRepository(Store(url))
    fresh_s3fs()  # the server is another process: its own filesystem instance
    mirror = mirror_of(url, tmp_path)
    original = Store.write

    def server_syncs_before_the_commit(self: Store, key: str, data: bytes) -> None:
        if self is trainer.store and key.endswith(MANIFEST_FILE):
            assert mirror.sync()
        original(self, key, data)

    try:
        publish_clf(trainer, tmp_path, 1)
        assert mirror.sync() and mirror.cache.list_versions("clf") == [1]
        monkeypatch.setattr(Store, "write", server_syncs_before_the_commit)
        publish_clf(trainer, tmp_path, 2)
        monkeypatch.undo()
        assert mirror.sync(), mirror.problem
        assert mirror.cache.list_versions("clf") == [1, 2]
    finally:
        mirror.stop()


def test_a_version_deleted_while_the_server_reads_it_is_no_store_failure(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retention deletes a version's manifest first: between the server's listing and its read
    of the manifest the version stopped being committed, and the next newest is served."""
    repo = StoreRepository(Store(url))
    publish_clf(repo, tmp_path, 1)
    publish_clf(repo, tmp_path, 2)
    mirror = mirror_of(url, tmp_path)
    listing = Store.listing
    deleted: list[int] = []

    def retention_runs_after_the_listing(self: Store, *args: Any, **kwargs: Any) -> Any:
        found = listing(self, *args, **kwargs)
        if self is mirror.store and not deleted:
            repo.store.remove([f"clf/2/{MANIFEST_FILE}"])
            deleted.append(2)
        return found

    monkeypatch.setattr(Store, "listing", retention_runs_after_the_listing)
    try:
        assert mirror.sync() and mirror.problem is None
        assert mirror.cache.list_versions("clf") == [1]
    finally:
        mirror.stop()


def test_a_version_missing_a_file_is_skipped_not_a_store_failure(
    url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = StoreRepository(Store(url))
    publish_clf(repo, tmp_path, 1)
    publish_clf(repo, tmp_path, 2)
    Store(url).remove(["clf/2/model.onnx"])
    mirror = mirror_of(url, tmp_path)
    try:
        with caplog.at_level(logging.ERROR, logger="serving.store_mirror"):
            assert mirror.sync() and mirror.problem is None
        assert "skipping clf version 2" in caplog.text and "clf/2/model.onnx" in caplog.text
        assert mirror.cache.list_versions("clf") == [1]
    finally:
        mirror.stop()


def _files_as(info: Any) -> Any:
    """A manifest edit: every file of the version described by ``info``."""
    return lambda doc: {**doc, "files": {name: info for name in doc["files"]}}


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda doc: b"[" * 100_000, "recursion depth"),
        (_files_as({"size": 1e999, "sha256": "0"}), "infinity"),  # int(inf): OverflowError
        (lambda doc: {**doc, "files": {".": {"size": 1, "sha256": "0"}}}, "unsafe file name '.'"),
        (lambda doc: {**doc, "files": {"x\n": {"size": 1, "sha256": "0"}}}, "unsafe file name"),
        (lambda doc: {**doc, "files": {}}, "lists no model.onnx"),
    ],
)
def test_a_malformed_manifest_skips_its_version_and_fails_no_sync(
    url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, edit: Any, why: str
) -> None:
    """A manifest the store holds may be anything: each malformed one skips its version (the
    next newest is served) instead of escaping the sync, which killed the server's start or its
    mirror thread, or (no model file) committing an empty version that shadowed the older one."""
    repo = StoreRepository(Store(url))
    publish_clf(repo, tmp_path, 1)
    publish_clf(repo, tmp_path, 2)
    store = Store(url)
    edited = edit(json.loads(store.read(f"clf/2/{MANIFEST_FILE}")))
    store.write(
        f"clf/2/{MANIFEST_FILE}",
        edited if isinstance(edited, bytes) else json.dumps(edited).encode(),
    )
    mirror = mirror_of(url, tmp_path)
    try:
        with caplog.at_level(logging.ERROR, logger="serving.store_mirror"):
            assert mirror.sync() and mirror.problem is None
        assert "skipping clf version 2" in caplog.text and why in caplog.text
        assert mirror.cache.list_versions("clf") == [1]
    finally:
        mirror.stop()


def test_a_config_that_is_not_utf8_on_the_store_mirrors_the_newest_version(
    url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The mirror reads the config's version policy as the local repository does: an
    undecodable config.pbtxt is a warning naming it (its UnicodeDecodeError escaped the sync)."""
    repo = StoreRepository(Store(url))
    publish_clf(repo, tmp_path, 1)
    publish_clf(repo, tmp_path, 2)
    Store(url).write("clf/config.pbtxt", b"\xff\xfe name: 'clf'")
    mirror = mirror_of(url, tmp_path)
    try:
        with caplog.at_level(logging.WARNING, logger="serving.store_mirror"):
            assert mirror.sync() and mirror.problem is None
        assert "config.pbtxt" in caplog.text and "utf-8" in caplog.text
        assert mirror.cache.list_versions("clf") == [2]
    finally:
        mirror.stop()


def test_a_failing_cache_disk_is_a_problem_retried_not_a_dead_mirror(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local cache failing (a full disk) escaped sync() as OSError: at start a traceback,
    later the mirror thread's death (the server silently stopped following the store). It is
    now a problem retried with backoff, as an unanswering store is; and a sync that fails for
    any other reason (a bug) no longer ends the thread."""
    import serving.store_mirror as store_mirror

    repo = StoreRepository(Store(url))
    publish_clf(repo, tmp_path, 1)
    mirror = mirror_of(url, tmp_path, poll_s=0.01)

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    try:
        monkeypatch.setattr(store_mirror, "atomic_write", disk_full)
        assert not mirror.sync()
        assert "No space left on device" in mirror.problem and str(mirror.cache.root) in (
            mirror.problem
        )
        monkeypatch.undo()
        assert mirror.sync() and mirror.problem is None
        assert mirror.cache.list_versions("clf") == [1]

        calls: list[int] = []

        def a_bug_then_stop() -> bool:
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("a bug in one pass")
            mirror._stop.set()
            return True

        monkeypatch.setattr(mirror, "sync", a_bug_then_stop)
        mirror._run()  # returns once the second pass stops it: the first one's bug was survived
        assert len(calls) == 2
    finally:
        mirror.stop()


def test_retention_keeps_newest_best_and_leased(url: str, tmp_path: Path) -> None:
    repo = StoreRepository(Store(url))
    for seed, acc in enumerate([0.1, 0.9, 0.3, 0.4, 0.5], start=1):
        publish_clf(repo, tmp_path, seed, test_acc=acc)
    mirror = mirror_of(url, tmp_path)
    mirror.versions = 5  # this server serves all five
    try:
        assert mirror.sync()
        mirror.cache.mark_in_use("clf", 3)  # what the watcher does for the version it serves
        assert mirror.sync()
        assert repo.leased_versions("clf") == {3}
        assert repo.apply_retention("clf", keep_last=1, keep_best_metric="test_acc") == [1, 4]
        assert repo.list_versions("clf") == [2, 3, 5]
        assert not any(k.startswith(("clf/1/", "clf/4/")) for k in keys(url))
        # the server drops what the store no longer has, but not what it serves
        assert mirror.sync() and mirror.cache.list_versions("clf") == [2, 3, 5]
        mirror.cache.release_all()
        assert mirror.sync() and repo.leased_versions("clf") == set()
        assert repo.apply_retention("clf", keep_last=1) == [2, 3]
    finally:
        mirror.stop()
    assert [k for k in keys(url) if ".lease-" in k] == []  # stop() removed its lease


def test_cache_is_bounded_least_recently_used_first(url: str, tmp_path: Path) -> None:
    repo = StoreRepository(Store(url))
    publish_clf(repo, tmp_path, 1)
    listing = Store(url).listing("clf/1")
    one_version = sum(e.size for k, e in listing.items() if not k.endswith(MANIFEST_FILE))
    mirror = mirror_of(url, tmp_path, cache_max_bytes=int(2.5 * one_version))  # room for two
    try:
        assert mirror.sync()
        lease = mirror.cache.mark_in_use("clf", 1)  # served: never evicted
        for seed in (2, 3, 4):
            publish_clf(repo, tmp_path, seed)
            assert mirror.sync()
        assert mirror.cache.list_versions("clf") == [1, 4]
        mirror.cache.release("clf", 1, lease)
        publish_clf(repo, tmp_path, 5)
        # 1 was served until just now, 4 never was: 4 is the least recently used
        assert mirror.sync() and mirror.cache.list_versions("clf") == [1, 5]
        publish_clf(repo, tmp_path, 6)
        assert mirror.sync() and mirror.cache.list_versions("clf") == [5, 6]
    finally:
        mirror.stop()


# ---------------------------------------------------------------- serving through the store


def serve(mirror: StoreMirror) -> tuple[RepositoryWatcher, DataPlane]:
    registry = ModelRegistry()
    watcher = RepositoryWatcher(
        mirror.cache, registry, ServingConfig(instances=1, providers="cpu"), poll_interval_s=0.05
    )
    mirror.start()
    watcher.start()
    dataplane = DataPlane(
        registry,
        ready=lambda: serving_ready(watcher, mirror),
        not_ready_reason=lambda: mirror.problem,
        configs=mirror.cache.version_config,
    )
    return watcher, dataplane


def test_ready_waits_for_a_poll_after_the_first_sync(url: str, tmp_path: Path) -> None:
    """Before: ready was the watcher's start and the mirror's first sync, so a store that
    answered only after the watcher's first poll gave 200 from ready and 404 for its model
    until the next poll (CI: test_fedserve_serve_waits_for_the_store_then_serves)."""
    publish_clf(StoreRepository(Store(url)), tmp_path, 1)
    mirror = mirror_of(url, tmp_path)
    registry = ModelRegistry()
    watcher = RepositoryWatcher(
        mirror.cache, registry, ServingConfig(instances=1, providers="cpu"), poll_interval_s=3600
    )
    watcher.start()  # the cache is empty: the store has not been synced yet
    try:
        assert not serving_ready(watcher, mirror)
        assert mirror.sync() and mirror.cache.list_versions("clf") == [1]
        assert not serving_ready(watcher, mirror)  # clf is in the cache, not yet served
        watcher.poll_once()
        assert serving_ready(watcher, mirror)
        assert registry.versions("clf") == [1]
    finally:
        watcher.stop()
        mirror.stop()


def answer(dataplane: DataPlane, x: np.ndarray) -> tuple[int, np.ndarray]:
    result = asyncio.run(dataplane.infer(dataplane.lookup("clf"), InferRequest({"x": x}), None))
    return result.model_version, result.outputs["logits"]


def wait_for_version(dataplane: DataPlane, version: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if dataplane.lookup("clf").version == version:
                return
        except LookupError:
            pass
        assert time.monotonic() < deadline, f"version {version} never served"
        time.sleep(0.05)


def test_server_follows_the_store_and_survives_its_absence(
    url: str, tmp_path: Path, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    repo = StoreRepository(Store(url))
    publish_clf(repo, tmp_path, 1)
    mirror = mirror_of(url, tmp_path, poll_s=0.1, retry_max_s=0.5)
    watcher, dataplane = serve(mirror)
    x = np.random.default_rng(0).random((2, IN_FEATURES), dtype=np.float32)
    try:
        assert asyncio.run(dataplane.ready()) and mirror.cache.leased_versions("clf") == {1}
        publish_clf(repo, tmp_path, 2)
        wait_for_version(dataplane, 2)
        w, b = classifier_weights(2)
        version, out = answer(dataplane, x)
        assert version == 2
        np.testing.assert_allclose(out, x @ w + b, rtol=1e-5, atol=1e-5)
        # the store goes away: version 2 keeps serving, the mirror says what fails
        with caplog.at_level(logging.WARNING, logger="serving.store_mirror"):
            proxy.down()
            deadline = time.monotonic() + 30
            while mirror.problem is None:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert answer(dataplane, x)[0] == 2
            with pytest.raises(StoreError, match=rf"model store {url}: list"):
                publish_clf(repo, tmp_path, 3)
            time.sleep(1.0)  # a few retries, with backoff
        assert url in mirror.problem and "list" in mirror.problem
        retries = [r for r in caplog.records if "retrying in" in r.getMessage()]
        assert retries and all("\n" not in r.getMessage() for r in retries)
        assert mirror.next_wait() > 0.1  # backing off
        assert asyncio.run(dataplane.ready())  # the first sync was done: it keeps serving
        # the store is back: the server catches up
        proxy.up()
        assert publish_clf(repo, tmp_path, 4) == 3  # the failed publish took no number
        wait_for_version(dataplane, 3)
        version, out = answer(dataplane, x)
        w, b = classifier_weights(4)
        assert version == 3
        # the pass that downloaded version 3 clears the problem once it has also mirrored the
        # leases: the watcher may load the version before that pass ends
        deadline = time.monotonic() + 30
        while mirror.problem is not None:
            assert time.monotonic() < deadline, mirror.problem
            time.sleep(0.05)
        np.testing.assert_allclose(out, x @ w + b, rtol=1e-5, atol=1e-5)
    finally:
        watcher.stop()
        mirror.cache.release_all()
        mirror.stop()


def test_store_unreachable_at_start_is_not_ready_until_it_answers(
    url: str, tmp_path: Path, proxy: TcpProxy
) -> None:
    repo = StoreRepository(Store(url))
    publish_clf(repo, tmp_path, 1)
    proxy.down()
    mirror = mirror_of(url, tmp_path, poll_s=0.1, retry_max_s=0.3)
    watcher, dataplane = serve(mirror)
    try:
        assert not asyncio.run(dataplane.ready())
        reason = asyncio.run(dataplane.not_ready_reason())
        assert reason is not None and url in reason and "list" in reason
        proxy.up()
        wait_for_version(dataplane, 1)
        assert asyncio.run(dataplane.ready())
        assert asyncio.run(dataplane.not_ready_reason()) is None
    finally:
        watcher.stop()
        mirror.cache.release_all()
        mirror.stop()


# ---------------------------------------------------------------- bad input, other stores


def test_unreachable_or_misconfigured_store_is_one_line(url: str, proxy: TcpProxy) -> None:
    with pytest.raises(StoreError) as info:
        open_repository(f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/repo")
    message = str(info.value)
    assert "\n" not in message and "s3://no-such-bucket" in message and "list" in message
    proxy.down()
    with pytest.raises(StoreError, match=rf"^model store {url}: list .* failed: Endpoint"):
        open_repository(url)
    with pytest.raises(StoreError, match="not a store URL"):
        Store("nope://bucket/x")


def test_second_server_on_one_cache_is_refused(url: str, tmp_path: Path) -> None:
    first = mirror_of(url, tmp_path)
    try:
        with pytest.raises(RepositoryError, match="serving.store.cache_dir"):
            mirror_of(url, tmp_path)
    finally:
        first.stop()


def test_any_fsspec_store_works_not_only_s3(tmp_path: Path) -> None:
    url = f"memory://fedserve-{uuid.uuid4().hex[:8]}/repo"
    repo = open_repository(url)
    src = tmp_path / "tiny.onnx"
    make_onnx(src)
    assert repo.publish("tiny", src, max_batch_size=4) == 1
    mirror = mirror_of(url, tmp_path)
    try:
        assert mirror.sync()
        assert mirror.cache.list_versions("tiny") == [1]
        mirror.cache.verify("tiny", 1)
    finally:
        mirror.stop()


# ---------------------------------------------------------------- the command lines

ROOT = Path(__file__).resolve().parents[1]


def test_training_refuses_an_unreachable_store_before_it_starts(url: str, proxy: TcpProxy) -> None:
    proxy.down()
    env = {**os.environ, "PYTHONPATH": str(ROOT), **store_env(proxy.url)}
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", f"repository={url}", "rounds=1", "num_clients=2",
         "dataset=digits", f"hydra.run.dir={proxy_dir(url)}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert f"repository={url}" in last and "list" in last and "EndpointConnectionError" in last
    assert "SuperLink" not in done.stderr + done.stdout  # nothing was started


def proxy_dir(url: str) -> str:
    return str(Path(tempfile.gettempdir()) / f"fedserve-store-run-{url.split('/')[3]}")


def test_fedserve_serve_waits_for_the_store_then_serves(
    url: str, tmp_path: Path, proxy: TcpProxy
) -> None:
    repo = StoreRepository(Store(url))
    publish_clf(repo, tmp_path, 1)
    proxy.down()
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), **store_env(proxy.url)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", f"repository={url}", f"port={port}",
         f"serving.grpc_port={free_port()}", "serving.instances=1", "serving.store.poll_s=0.2",
         "serving.store.retry_max_s=0.5",
         f"serving.store.cache_dir={tmp_path / 'cache'}", "log_level=warning"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/v2"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                r = httpx.get(f"{base}/health/ready")
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.1)
        assert r.status_code == 503 and url in r.json()["reason"]
        proxy.up()
        while httpx.get(f"{base}/health/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        body = {
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]
        }
        assert httpx.post(f"{base}/models/clf/infer", json=body).status_code == 200
        while repo.leased_versions("clf") != {1}:  # its lease, mirrored into the store
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "retrying in" in out and f"model store {url}: list" in out
    assert repo.leased_versions("clf") == set()  # removed on shutdown


@pytest.mark.slow
def test_server_follows_a_training_run_through_the_store(tmp_path: Path) -> None:
    """fedserve-train publishing to moto's S3 while fedserve-serve follows the store: every
    version is served, its accuracy equal to torch's (the benchmark's quick run)."""
    from benchmarks.storage import train_to_serve

    out = tmp_path / "result.json"  # not the checkout's benchmarks/results/
    assert train_to_serve.main(["--quick", "--workdir", str(tmp_path), "--out", str(out)]) == 0
    assert out.is_file()
    result = json.loads((train_to_serve.RESULTS / "train_to_serve_store-quick.json").read_text())
    assert all(v is not None for v in result["latency_s"]["store"])
    assert len(result["latency_s"]["store"]) == 2
