"""``serving.frontends=N``: fedserve-serve with front-end processes on the same ports, one engine
pool behind them (serving.dataplane_link, serving.frontend_processes, serving.frontend_worker).

The conformance suite (tests/test_conformance.py) runs every KServe v2 check through the link as
well; here the real processes: connections spread over them, one statistics and one pool, a
killed front-end process replaced, SIGTERM stops them all, and they stop when the engine
process dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import httpx
import numpy as np
import psutil
import pytest
from process_marker import wait_until_marked_gone
from serving_helpers import IN_FEATURES, classifier_weights, publish_classifier
from tritonclient.grpc import service_pb2, service_pb2_grpc

from server.processes import free_port
from serving.repository import ModelRepository

ROOT = Path(__file__).resolve().parent.parent
X = np.random.default_rng(0).random((1, IN_FEATURES), dtype=np.float32)


def _body() -> dict:
    return {"inputs": [{"name": "x", "shape": [1, IN_FEATURES], "datatype": "FP32",
                        "data": X.ravel().tolist()}]}  # fmt: skip


class Server:
    def __init__(self, proc: subprocess.Popen[str], port: int, grpc_port: int) -> None:
        self.proc = proc
        self.port = port
        self.grpc_port = grpc_port
        self.url = f"http://127.0.0.1:{port}"

    def frontends(self) -> list[psutil.Process]:
        """The live front-end processes (the engine process's children running the worker;
        one killed is a zombie until the engine process reaps it)."""
        found = []
        for child in psutil.Process(self.proc.pid).children():
            try:
                if "serving.frontend_worker" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.Error:
                pass
        return found

    def serving_pids(self, port: int) -> set[int]:
        """The processes (engine and front ends) holding an established connection on ``port``."""
        pids = set()
        for process in [psutil.Process(self.proc.pid), *self.frontends()]:
            for conn in process.net_connections("tcp"):
                if conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == port:
                    pids.add(process.pid)
        return pids


@contextmanager
def serving(tmp_path: Path, frontends: int) -> Iterator[Server]:
    repo = ModelRepository(tmp_path / "repo")
    publish_classifier(repo, tmp_path, seed=1)
    port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", f"repository={repo.root}", f"port={port}",
         "serving.instances=1", "log_level=warning", f"serving.grpc_port={grpc_port}",
         f"serving.frontends={frontends}", "serving.drain_timeout_s=5",
         "serving.json_offload_bytes=0"],  # every JSON body decoded in a helper process
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    server = Server(proc, port, grpc_port)
    try:
        deadline = time.monotonic() + 90
        while True:  # the banner, printed once the front-end processes listen too
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "fedserve-serve exited before it listened"
            if "processes run the front ends" in line:
                break
            assert time.monotonic() < deadline, "fedserve-serve did not listen in time"
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _expected() -> np.ndarray:
    w, b = classifier_weights(1)
    return X @ w + b


def _grpc_infer(port: int) -> np.ndarray:
    request = service_pb2.ModelInferRequest(model_name="clf", raw_input_contents=[X.tobytes()])
    request.inputs.add(name="x", datatype="FP32", shape=list(X.shape))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    return np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(1, -1)


def test_front_end_processes_share_the_ports_and_one_engine_pool(
    tmp_path: Path, process_marker: str
) -> None:
    connections = 24
    with serving(tmp_path, frontends=3) as server:
        workers = server.frontends()
        assert len(workers) == 2
        with ExitStack() as stack:  # connections held open, so each shows where it landed
            clients = [
                stack.enter_context(httpx.Client(base_url=server.url)) for _ in range(connections)
            ]
            for client in clients:
                r = client.post("/v2/models/clf/infer", json=_body())
                assert r.status_code == 200, r.text
                got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(1, -1)
                np.testing.assert_allclose(got, _expected(), rtol=1e-5, atol=1e-5)
            # 24 connections over 3 processes: all on one has a chance of 3 / 3**24
            assert len(server.serving_pids(server.port)) >= 2
        for _ in range(connections):  # a channel each: a connection each
            np.testing.assert_allclose(
                _grpc_infer(server.grpc_port), _expected(), rtol=1e-5, atol=1e-5
            )
        # one dataplane: the statistics count every request, whichever process took it
        stats = httpx.get(server.url + "/v2/models/clf/stats").json()["model_stats"][0]
        assert int(stats["inference_stats"]["success"]["count"]) == 2 * connections
        config = httpx.get(server.url + "/v2/models/clf/config").json()
        assert config["instance_group"][0]["count"] == 1  # one pool, one engine (instances=1)
        metrics = httpx.get(server.url + "/metrics").text
        assert f'nv_inference_request_success{{model="clf",version="1"}} {2 * connections}' in (
            metrics
        )

        # a front-end process that dies is replaced; the server keeps answering
        killed = workers[0].pid
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while {w.pid for w in server.frontends()} - {killed} == {workers[1].pid}:
            assert time.monotonic() < deadline, "the killed front-end process was not replaced"
            time.sleep(0.2)
        for _ in range(connections):
            assert httpx.post(server.url + "/v2/models/clf/infer", json=_body()).status_code == 200

        server.proc.send_signal(signal.SIGTERM)
        out, _ = server.proc.communicate(timeout=60)
    assert server.proc.returncode == 0, out
    assert "fedserve stopped" in out
    assert "exited with -9 after" in out and "starting another in 1 s" in out
    assert wait_until_marked_gone(process_marker) == []


def test_front_end_processes_stop_when_the_engine_process_dies(
    tmp_path: Path, process_marker: str
) -> None:
    with serving(tmp_path, frontends=2) as server:
        (worker,) = server.frontends()
        server.proc.kill()  # no chance to stop them: they see their link close
        server.proc.wait(10)
        try:
            worker.wait(timeout=30)
        except psutil.TimeoutExpired:
            worker.kill()
            pytest.fail("the front-end process outlived its engine process")
    assert wait_until_marked_gone(process_marker) == []


def test_a_stop_while_front_end_processes_start_returns_at_once(process_marker: str) -> None:
    """A SIGTERM or Ctrl-C while the front-end processes started waited for them to listen (up
    to a minute), and a second Ctrl-C then failed the start with a traceback."""
    import asyncio

    from serving.dataplane import DataPlane
    from serving.frontend_processes import FrontendProcesses
    from serving.registry import ModelRegistry

    async def start_stopped() -> FrontendProcesses:
        stop = asyncio.Event()
        stop.set()  # the signal came first: no front-end process gets to listen
        processes = FrontendProcesses(1, DataPlane(ModelRegistry()), config=None)
        await asyncio.wait_for(processes.start(stop), 10)
        await processes.stop(0)
        return processes

    processes = asyncio.run(start_stopped())
    assert all(p.poll() is not None for p in processes.processes)
    assert wait_until_marked_gone(process_marker) == []
