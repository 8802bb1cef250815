"""Would more front-end processes help here? One server process vs N processes sharing the port.

    .venv/bin/python -m benchmarks.serving.frontend_processes [--processes 2] [--rounds 3]

The best case for several front-end processes is N complete servers on one ``SO_REUSEPORT``
port, each with its own engines (no forwarding of tensors between processes at all): if even
that does not beat one process with the same total engines on this machine, a design that keeps
one shared engine pool and forwards requests to it (which costs more CPU per request) cannot
either. Both serve the MNIST ``cnn`` (random weights, exported by ``server/export.py``) with the
same total engines (2), dynamic batching as configured by default; load: wrk, 32 connections,
binary batch-1 requests, interleaved rounds; reported: requests/s, p50/p99 and the servers' CPU
per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import uvloop

from benchmarks.common import median, table
from benchmarks.serving.load import wrk_load
from benchmarks.serving.models import bodies_for, export_models
from server.processes import free_port, stop_process_group
from serving.v2_client import V2Client


def serve_child(repo: str, port: int, instances: int) -> None:
    """One complete server (watcher, engines, HTTP front end) on a ``SO_REUSEPORT`` socket."""
    from serving.api import ApiSettings, create_app
    from serving.dataplane import DataPlane
    from serving.http_server import http_server, listen_socket
    from serving.registry import ModelRegistry
    from serving.repository import ModelRepository
    from serving.settings import ServingConfig
    from serving.watcher import RepositoryWatcher

    settings = dataclasses.replace(ServingConfig(), instances=instances, providers="cpu")
    registry = ModelRegistry()
    watcher = RepositoryWatcher(ModelRepository(repo), registry, settings)
    watcher.start()
    dataplane = DataPlane(registry, ready=lambda: watcher.ready)
    app = create_app(dataplane, settings=ApiSettings.from_config(settings, None))
    sock = listen_socket("127.0.0.1", port, reuse_port=True)
    server = http_server(app, "127.0.0.1", port, settings, log_level="warning")
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:  # as fedserve-serve
            runner.run(server.serve(sockets=[sock]))
    finally:
        watcher.stop()


@contextlib.contextmanager
def servers(repo: Path, processes: int, engines: int) -> Iterator[tuple[str, list[int]]]:
    port = free_port()
    procs = [
        subprocess.Popen([sys.executable, "-m", "benchmarks.serving.frontend_processes",
                          "--serve", str(repo), "--port", str(port),
                          "--instances", str(engines // processes)])
        for _ in range(processes)
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        with V2Client(base, timeout=2.0) as client:
            client.wait_until_ready(120, model="cnn")
        time.sleep(1.0)  # every process listening
        yield base, [p.pid for p in procs]
    finally:
        for p in procs:
            stop_process_group(p, grace=15.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--engines", type=int, default=2, help="engines in total, split evenly")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window", type=float, default=4.0)
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--instances", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve_child(args.serve, args.port, args.instances)
        return 0
    with tempfile.TemporaryDirectory(prefix="fedserve-frontends-") as tmp:
        repo = Path(tmp, "repo")
        info = export_models(repo, ["cnn"])["cnn"]
        body, hlen = bodies_for(info)[1]
        results: dict[int, list[dict]] = {1: [], args.processes: []}
        with contextlib.ExitStack() as stack:
            running = {n: stack.enter_context(servers(repo, n, args.engines)) for n in results}
            for _ in range(args.rounds):
                for n, (base, pids) in running.items():
                    r = wrk_load(f"{base}/v2/models/cnn/infer", body, header_length=hlen, rows=1,
                                 connections=32, warmup_s=1.0, window_s=args.window, windows=1,
                                 server_pids=pids).as_dict()  # fmt: skip
                    r["cpu_us_per_request"] = 1e6 * r["server_cores"] / max(r["requests_per_s"], 1)
                    results[n].append(r)
    rows = []
    for n, samples in results.items():
        rows.append(
            [
                f"{n} process{'es' if n > 1 else ''} x {args.engines // n} engines",
                f"{median([r['requests_per_s'] for r in samples]):,.0f}",
                f"{median([r['p50_ms'] for r in samples]):.1f}",
                f"{median([r['p99_ms'] for r in samples]):.1f}",
                f"{median([r['server_cores'] for r in samples]):.2f}",
                f"{median([r['cpu_us_per_request'] for r in samples]):,.0f}",
                f"{median([r['machine_busy_cores'] for r in samples]):.2f}",
            ]
        )
    print(
        table(
            ["servers (batch 1, wrk 32 connections)", "req/s", "p50 ms", "p99 ms",
             "server cores", "server CPU us/request", "machine busy cores"],
            rows,
        )
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
