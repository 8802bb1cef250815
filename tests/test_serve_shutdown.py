"""``fedserve-serve`` stopped by SIGTERM or SIGINT under load: the requests in flight are answered,
the process exits 0 and leaves no lease behind (issue 14: uvicorn re-raised the signal, so the
drain and the lease removal never ran and the exit status was -15)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from serving_helpers import publish_classifier

from server.processes import free_port
from serving.repository import ModelRepository

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":[1,2,3,4]}]}'


def start_server(repo: ModelRepository, port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", f"repository={repo.root}", f"port={port}",
         "serving.instances=1", "log_level=warning", f"serving.grpc_port={free_port()}",
         "serving.drain_timeout_s=10"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start: {proc.communicate()[0]}")
        time.sleep(0.1)


def test_sigterm_under_load_drains_exits_0_and_releases_leases(tmp_path: Path) -> None:
    """(SIGINT takes the same path: tests/test_api.py::test_cli_serves_until_sigint.)"""
    repo = ModelRepository(tmp_path / "repo")
    publish_classifier(repo, tmp_path, seed=1)
    port = free_port()
    proc = start_server(repo, port)
    url = f"http://127.0.0.1:{port}/v2/models/clf/infer"
    outcomes: list[str] = []
    stop = threading.Event()

    def client() -> None:
        # a fresh connection per request: a request is either refused (never accepted) or in
        # flight, and an in-flight one must be answered
        while not stop.is_set():
            try:
                r = httpx.post(url, content=BODY, headers={"Connection": "close"}, timeout=30)
                outcomes.append("ok" if r.status_code == 200 else f"status {r.status_code}")
            except httpx.ConnectError:
                outcomes.append("refused")
                time.sleep(0.01)
            except httpx.TransportError as exc:
                outcomes.append(f"lost: {type(exc).__name__}")

    threads = [threading.Thread(target=client) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        while outcomes.count("ok") < 200:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, out
    assert "fedserve stopped" in out
    lost = [o for o in outcomes if o not in ("ok", "refused")]
    assert lost == [], lost
    assert repo.leased_versions("clf") == set()
