"""Front-end processes: one fedserve-serve process vs ``serving.frontends=N`` vs N whole servers.

    .venv/bin/python -m benchmarks.serving.frontend_processes [--processes 2] [--rounds 3]

Four ways to serve the MNIST ``cnn`` (random weights, exported by ``server/export.py``) on this
machine, all but one with the same total engines (2), each over HTTP (wrk, 32 connections, binary
batch-1 requests) and gRPC (h2load, 8 connections x 4 streams: with SO_REUSEPORT each connection
lands on one process, so a few connections could all land on one), interleaved rounds, medians:

* ``1 process``: fedserve-serve as it runs by default;
* ``1 process, 2 / N engines``: the same with one whole server's engines, to tell what the
  next contender's servers gain from their smaller pools from what they gain from a second
  process;
* ``frontends=N``: fedserve-serve with ``serving.frontends=N``: N - 1 front-end processes on the
  same ports forward each call to the engine process, which keeps the one engine pool
  (:mod:`serving.dataplane_link`);
* ``N servers``: N complete fedserve-serve processes on one ``SO_REUSEPORT`` port pair, each with
  its own engines (2 / N): no forwarding at all, but N pools, N memory budgets and N sets of
  statistics — the bound a forwarding design can approach, not a way to serve.

Reported: requests/s, p50/p99, the server processes' CPU per request and the machine's busy cores
(the load generator shares the 2 cores).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil

from benchmarks.common import median, table
from benchmarks.serving.grpc_load import check_target, h2load_available, h2load_load, infer_frame
from benchmarks.serving.load import wrk_load
from benchmarks.serving.models import bodies_for, export_models
from benchmarks.serving.servers import server_process
from server.processes import free_port
from serving.v2_client import V2Client

ROOT = Path(__file__).resolve().parents[2]
GRPC_CONNECTIONS, GRPC_STREAMS = 8, 4


def _family(pid: int) -> list[int]:
    try:
        return [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def _serve_cmd(repo: Path, port: int, grpc_port: int, engines: int, frontends: int) -> list[str]:
    return [
        sys.executable, "-m", "serving.cli", f"repository={repo}", f"port={port}",
        "log_level=warning", "models=[cnn]", "serving.providers=cpu",
        f"serving.instances={engines}", f"serving.grpc_port={grpc_port}",
        f"serving.frontends={frontends}",
    ]  # fmt: skip


def serve_whole(repo: str, port: int, grpc_port: int, engines: int) -> None:
    """One complete server (watcher, engines, dataplane, HTTP and gRPC) joining ports others
    share (SO_REUSEPORT), as a front-end process joins them, but with engines of its own."""
    import asyncio

    from serving.api import ApiSettings, create_app
    from serving.dataplane import DataPlane
    from serving.registry import ModelRegistry
    from serving.repository import ModelRepository
    from serving.servers import event_loop_factory, run_servers
    from serving.settings import ServeConfig, ServingConfig
    from serving.watcher import RepositoryWatcher

    settings = ServingConfig(instances=engines, providers="cpu", grpc_port=grpc_port)
    conf = ServeConfig(repository=repo, port=port, log_level="warning", serving=settings)
    registry = ModelRegistry()
    watcher = RepositoryWatcher(ModelRepository(repo), registry, settings)
    watcher.start()
    dataplane = DataPlane(registry, ready=lambda: watcher.ready, scheduler=watcher.scheduler)
    app = create_app(dataplane, settings=ApiSettings.from_config(settings, None))
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(run_servers(conf, app, dataplane, joining=True))
    finally:
        watcher.stop()


def _wait_listening(pids: list[int], port: int, timeout_s: float = 120.0) -> None:
    """Until every process in ``pids`` listens on ``port`` and has had 3 s to load its model."""
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while not any(
            c.status == psutil.CONN_LISTEN and c.laddr.port == port
            for c in psutil.Process(pid).net_connections("tcp")
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {pid} did not listen on {port}")
            time.sleep(0.1)
    time.sleep(3.0)


@contextlib.contextmanager
def contender(
    repo: Path, kind: str, processes: int, engines: int
) -> Iterator[tuple[str, str, Callable[[], list[int]]]]:
    """Runs one contender; yields its HTTP base URL, gRPC address and its processes' pids."""
    port, grpc_port = free_port(), free_port()
    base, address = f"http://127.0.0.1:{port}", f"127.0.0.1:{grpc_port}"
    with contextlib.ExitStack() as stack:
        if kind == "servers":
            cmd = [sys.executable, "-m", "benchmarks.serving.frontend_processes", "--serve",
                   str(repo), "--port", str(port), "--grpc-port", str(grpc_port),
                   "--engines", str(engines // processes)]  # fmt: skip
            procs = [
                stack.enter_context(server_process(cmd, base, "servers", "cnn"))
                for _ in range(processes)
            ]
            pids = lambda: [pid for p in procs for pid in _family(p.pid)]  # noqa: E731
            _wait_listening([p.pid for p in procs], port)  # the first one ready answered all
        else:
            frontends = processes if kind == "frontends" else 1
            pool = engines // processes if kind == "one-small" else engines
            cmd = _serve_cmd(repo, port, grpc_port, pool, frontends)
            proc = stack.enter_context(server_process(cmd, base, kind, "cnn"))
            pids = lambda: _family(proc.pid)  # noqa: E731
        yield base, address, pids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--engines", type=int, default=2, help="engines in total")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--window", type=float, default=4.0)
    ap.add_argument("--kinds", default="one,one-small,frontends,servers")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--grpc-port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve_whole(args.serve, args.port, args.grpc_port, args.engines)
        return 0
    n = args.processes
    labels = {
        "one": "1 process",
        "one-small": f"1 process, {args.engines // n} engine(s)",
        "frontends": f"frontends={n} (one pool)",
        "servers": f"{n} servers (own pools)",
    }
    kinds = [k for k in args.kinds.split(",") if k]
    protocols = ["http", "grpc"] if h2load_available() else ["http"]
    with tempfile.TemporaryDirectory(prefix="fedserve-frontends-") as tmp:
        repo = Path(tmp, "repo")
        info = export_models(repo, ["cnn"])["cnn"]
        body, hlen = bodies_for(info)[1]
        x = np.random.default_rng(1).standard_normal((1, *info["shape"])).astype(np.float32)
        frame = infer_frame("cnn", info["input"], info["output"], x)
        results: dict[tuple[str, str], list[dict]] = {(k, p): [] for k in kinds for p in protocols}
        with contextlib.ExitStack() as stack:
            running = {k: stack.enter_context(contender(repo, k, n, args.engines)) for k in kinds}
            for base, address, _ in running.values():
                with V2Client(base, timeout=60.0) as client:
                    assert client.post("/v2/models/cnn/infer", body, hlen).status == 200
                if "grpc" in protocols:
                    check_target(address, frame)
            for _ in range(args.rounds):
                for (kind, protocol), samples in results.items():
                    base, address, pids = running[kind]
                    if protocol == "http":
                        r = wrk_load(f"{base}/v2/models/cnn/infer", body, header_length=hlen,
                                     rows=1, connections=32, warmup_s=1.0, window_s=args.window,
                                     windows=1, server_pids=pids).as_dict()  # fmt: skip
                    else:
                        r = h2load_load(address, frame, 1, warmup_s=1.0, window_s=args.window,
                                        server_pids=pids(), connections=GRPC_CONNECTIONS,
                                        streams=GRPC_STREAMS)  # fmt: skip
                    r["cpu_us_per_request"] = 1e6 * r["server_cores"] / max(r["requests_per_s"], 1)
                    print(f"{labels[kind]} {protocol}: {r['requests_per_s']:,.0f} req/s "
                          f"p99 {r['p99_ms']:.1f} ms", flush=True)  # fmt: skip
                    samples.append(r)
    rows = []
    for (kind, protocol), samples in results.items():
        one = results.get(("one", protocol))
        rate = median([r["requests_per_s"] for r in samples])
        rows.append(
            [
                f"{labels[kind]} {protocol}",
                f"{rate:,.0f}",
                f"{rate / median([r['requests_per_s'] for r in one]):.2f}" if one else "-",
                f"{median([r['p50_ms'] for r in samples]):.1f}",
                f"{median([r['p99_ms'] for r in samples]):.1f}",
                f"{median([r['server_cores'] for r in samples]):.2f}",
                f"{median([r['cpu_us_per_request'] for r in samples]):,.0f}",
                f"{median([r['machine_busy_cores'] for r in samples]):.2f}",
            ]
        )
    print(
        table(
            ["batch 1 (wrk 32 conns / h2load 8x4)", "req/s", "x 1 process", "p50 ms", "p99 ms",
             "server cores", "server CPU us/request", "machine busy cores"],
            rows,
        )
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
