"""The floor of a Python gRPC front end: CPU per ``ModelInfer`` call of a servicer that does
nothing (it returns a prebuilt ``ModelInferResponse``), under h2load.

    .venv/bin/python -m benchmarks.serving.grpc_floor [--calls 8000]

Three servers, each a subprocess of this module: ``grpc.aio`` on asyncio's loop, ``grpc.aio`` on
uvloop, and the thread-pool (sync) server with 8 threads; for each, the calls per second and the
server's CPU microseconds per call (``/proc/<pid>/stat`` before and after ``h2load -n CALLS -c 4
-m 8``). Whatever our gRPC front end does on top of this is ours; this much is grpcio's.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import numpy as np

from benchmarks.common import table
from benchmarks.serving.grpc_load import GRPC_PATH, infer_frame
from benchmarks.serving.load import proc_cpu_seconds
from server.processes import free_port

MODES = ("aio", "aio-uvloop", "sync-8-threads")


def _servicer() -> object:
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    response = service_pb2.ModelInferResponse(model_name="m", model_version="1")
    response.outputs.add(name="logits", datatype="FP32", shape=[1, 10])
    response.raw_output_contents.append(b"\0" * 40)

    class Noop(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request: object, context: object) -> object:  # noqa: N802
            return response

    class SyncNoop(service_pb2_grpc.GRPCInferenceServiceServicer):
        def ModelInfer(self, request: object, context: object) -> object:  # noqa: N802
            return response

    return Noop, SyncNoop


def serve(mode: str, port: int) -> None:
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    noop, sync_noop = _servicer()  # type: ignore[misc]
    if mode == "sync-8-threads":
        server = grpc.server(futures.ThreadPoolExecutor(8))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(sync_noop(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        server.wait_for_termination()
        return

    async def main() -> None:
        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(noop(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    if mode == "aio-uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def measure(mode: str, calls: int) -> list[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.serving.grpc_floor", "--serve",
                             mode, "--port", str(port)])  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the {mode} server did not start") from None
                time.sleep(0.05)
        with tempfile.TemporaryDirectory() as tmp:
            body = Path(tmp, "frame.bin")
            body.write_bytes(infer_frame("m", "x", "logits", np.zeros((1, 1, 28, 28), np.float32)))
            cpu0, t0 = proc_cpu_seconds([proc.pid])[proc.pid], time.monotonic()
            subprocess.run(
                ["h2load", f"http://127.0.0.1:{port}{GRPC_PATH}", "-n", str(calls), "-c", "4",
                 "-m", "8", "-t", "1", "-d", str(body), "-H", "content-type: application/grpc",
                 "-H", "te: trailers"],
                check=True, capture_output=True,
            )  # fmt: skip
            elapsed = time.monotonic() - t0
            cpu = proc_cpu_seconds([proc.pid])[proc.pid] - cpu0
    finally:
        proc.kill()
        proc.wait(10)
    return [mode, f"{calls / elapsed:,.0f}", f"{1e6 * cpu / calls:,.0f}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=8000)
    ap.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve, args.port)
        return 0
    rows = [measure(mode, args.calls) for mode in MODES]
    print(table(["no-op gRPC server", "calls/s", "server CPU us per call"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
