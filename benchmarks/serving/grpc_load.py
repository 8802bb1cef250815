"""Closed-loop gRPC load with h2load: the KServe v2 ``ModelInfer`` call, N streams in flight.

gRPC is HTTP/2 with a 5-byte frame header per message, so nghttp2's ``h2load`` (C, like wrk; Debian
package ``nghttp2-client``) loads a gRPC unary method by POSTing a framed ``ModelInferRequest`` to
``/inference.GRPCInferenceService/ModelInfer`` with ``content-type: application/grpc``. ``ghz`` is
not in the package registries this machine reaches, and a Python client (tritonclient.grpc.aio)
spends more CPU per call than the server it loads on 2 shared cores (measured: ~1,500 calls/s of
its own ceiling against a no-op). h2load's ``--log-file`` records every request's start and
duration, so throughput and p50/p99 come from the requests that completed in the measured window
(after ``--warm-up-time``). h2load sees HTTP status 200 for a gRPC error too (the status is in the
trailers), so each target is first checked with one real call (:func:`check_target`).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.serving.load import machine_busy, proc_cpu_seconds
from benchmarks.serving.paired import Load, progress

GRPC_PATH = "/inference.GRPCInferenceService/ModelInfer"
#: connections x streams per connection = 32 requests in flight, as wrk's 32 connections
CONNECTIONS, STREAMS = 4, 8


def h2load_available() -> bool:
    return shutil.which("h2load") is not None


def infer_frame(model: str, input_name: str, output_name: str, x: np.ndarray) -> bytes:
    """A length-prefixed gRPC message holding a ``ModelInferRequest`` with ``x`` as raw input
    contents (what tritonclient.grpc sends)."""
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name=input_name, datatype="FP32", shape=x.shape)
    request.outputs.add(name=output_name)
    request.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())
    payload = request.SerializeToString()
    return struct.pack(">BI", 0, len(payload)) + payload


def check_target(address: str, frame: bytes) -> None:
    """One real call with the framed request: raises the gRPC error if the target refuses it."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest.FromString(frame[5:])
    with grpc.insecure_channel(address) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=60
        )
    assert response.raw_output_contents or response.outputs, response


def h2load_load(
    address: str,
    frame: bytes,
    rows: int,
    *,
    warmup_s: float,
    window_s: float,
    server_pids: Sequence[int],
    connections: int = CONNECTIONS,
    streams: int = STREAMS,
) -> dict[str, float]:
    """One window of h2load against ``address`` (host:port), ``connections`` x ``streams`` calls
    in flight; the result has the keys of :class:`benchmarks.serving.load.LoadResult`'s
    windows."""
    with tempfile.TemporaryDirectory(prefix="fedserve-h2load-") as tmp:
        body = Path(tmp, "body.bin")
        body.write_bytes(frame)
        log = Path(tmp, "requests.log")
        cmd = [
            "h2load", f"http://{address}{GRPC_PATH}",
            "-c", str(connections), "-m", str(streams), "-t", "1",
            f"--warm-up-time={round(warmup_s * 1000)}ms", f"--duration={round(window_s * 1000)}ms",
            "-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers",
            f"--log-file={log}",
        ]  # fmt: skip
        cpu0, busy0 = proc_cpu_seconds(server_pids), machine_busy()
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.monotonic() - t0
        output = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
        proc.stdout and proc.stdout.close()
        cpu1, busy1 = proc_cpu_seconds(server_pids), machine_busy()
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"h2load failed: {output[-2000:]}")
        lines = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    codes = np.array([int(line[1]) for line in lines])
    durations_ms = np.array([int(line[2]) for line in lines]) / 1000.0
    ok = durations_ms[codes == 200]
    server = sum(v - cpu0.get(pid, 0.0) for pid, v in cpu1.items())
    client = usage.ru_utime + usage.ru_stime
    measured = max(window_s, 1e-9)
    return {
        "requests_per_s": len(ok) / measured,
        "rows_per_s": len(ok) * rows / measured,
        "p50_ms": float(np.percentile(ok, 50)) if len(ok) else float("nan"),
        "p99_ms": float(np.percentile(ok, 99)) if len(ok) else float("nan"),
        "errors": int((codes != 200).sum()),
        "completed": len(ok),
        # the warm-up's CPU counts too: h2load is one process for both, so these are averages
        "client_cores": client / elapsed,
        "server_cores": server / elapsed,
        "machine_busy_cores": (busy1[0] - busy0[0])
        / max(busy1[1] - busy0[1], 1e-9)
        * (os.cpu_count() or 1),
        "window_s": window_s,
        "warmup_s": warmup_s,
    }


class GrpcLoad(Load):
    """A gRPC contender of :func:`benchmarks.serving.paired.paired` (h2load instead of wrk)."""

    def __init__(
        self, label: str, address: str, frame: bytes, rows: int, pids: Sequence[int]
    ) -> None:
        super().__init__(label, address, frame, 0, rows, pids)

    def run(self, warmup_s: float, window_s: float, windows: int) -> list[dict]:
        pids = self.pids() if callable(self.pids) else self.pids
        out = []
        for _ in range(windows):
            r = h2load_load(
                self.url, self.body, self.rows, warmup_s=warmup_s, window_s=window_s,
                server_pids=pids,
            )  # fmt: skip
            cores = r["server_cores"]
            r["rows_per_core_s"] = r["rows_per_s"] / cores if cores > 0 else float("nan")
            progress(self.label, r)
            out.append(r)
        return out
