"""Serving benchmark: our KServe v2 server vs the hardware, a no-op endpoint and Ray Serve.

    .venv/bin/python benchmarks/serving_bench.py                        # everything, both models
    .venv/bin/python benchmarks/serving_bench.py --models cnn --sections http,policy
    .venv/bin/python benchmarks/serving_bench.py --skip-ray

For the MNIST ``cnn`` (FedAvg paper CNN, 1x28x28, 10 classes) and ``resnet18`` (3x32x32), random
weights, exported through ``server/export.py`` into a temporary model repository, it prints:

1. **http**: the ceiling (raw onnxruntime in this process: the better of one session x 2 intra-op
   threads and two 1-thread sessions driven by two threads) vs our server (``fedserve-serve`` with
   its default config: one uvicorn process, one engine per core) under 32 closed-loop connections
   sending binary-v2 requests of 1 and of 64 rows, and vs a no-op FastAPI endpoint on the same
   uvicorn settings (uvloop + httptools, one worker) that reads the same body and answers the same
   bytes;
2. **ray**: the same load against Ray Serve (2 onnxruntime replicas of 1 thread, ``@serve.batch``
   of up to 64 rows with a 1 ms wait, ``max_ongoing_requests=64``), paired with our server;
3. **policy**: least-loaded vs round-robin when one of the two engines is 4x slower (it sleeps
   3x its run time after each run: slower without taking CPU from the others; inline runs off so
   a sleeping engine never holds the event loop);
4. **dispatch**: the dispatcher's overhead per request in-process, with a null engine (no model).

Method. The machine is small (2 cores) and shared, so the compared measurements are interleaved:
each round measures every contender once (ceiling, ours, no-op; or ours, Ray; or least-loaded,
round-robin) for one window after its own warm-up, and the tables give medians over the rounds
(``--rounds``, default 3) and the median of the per-round ratios. A load whose steady-state latency
is seconds (ResNet-18 with 32 x 64-row requests: ~2,000 queued images, ~15 s) gets a warm-up of 1.5x
that latency and a window of up to 8 s, so its rounds take ~30 s each. Load comes from wrk
(``benchmarks/load.py``); latency is per request, send to last byte. Client, server and machine CPU
are reported in cores so the reader can see who was the bottleneck, and "images per server
core-second" is given next to images/s because it does not depend on how much of the shared machine
the run got. Results also go to ``--out`` (default ``benchmarks/results/serving.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# the repository root first, so `serving` is the package whatever the working directory
sys.path[:0] = [str(ROOT), str(HERE)]

from load import wrk_available, wrk_load  # noqa: E402

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")

MODELS = {"cnn": ((1, 28, 28), 10), "resnet18": ((3, 32, 32), 10)}
SECTIONS = ("http", "ray", "policy", "dispatch")
CONNECTIONS = 32
BATCHES = (1, 64)
HEADER = "Inference-Header-Content-Length"
LAYOUTS = (("1 session x 2 threads", 1, 2), ("2 sessions x 1 thread", 2, 1))


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import onnxruntime as ort

    return (
        f"{len(os.sched_getaffinity(0))} cores ({cpu}), onnxruntime {ort.__version__} "
        f"CPUExecutionProvider, Python {platform.python_version()}; load average at start "
        f"{os.getloadavg()[0]:.1f} (the machine is shared with other jobs)"
    )


def binary_body(x: np.ndarray, input_name: str, output_name: str) -> tuple[bytes, int]:
    """A binary-tensor KServe v2 request (what tritonclient sends) and its JSON header length."""
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": input_name,
                    "datatype": "FP32",
                    "shape": list(x.shape),
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
        },
        separators=(",", ":"),
    ).encode()
    return header + x.tobytes(), len(header)


def post(url: str, body: bytes, header_length: int | None, timeout: float = 120.0):
    headers = {"Content-Type": "application/octet-stream"}
    if header_length is not None:
        headers[HEADER] = str(header_length)
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, dict(resp.headers), resp.read()


def wait_http(url: str, proc: subprocess.Popen | None, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready within {timeout} s")


@contextlib.contextmanager
def server_process(cmd: list[str], ready_url: str, name: str) -> Iterator[subprocess.Popen]:
    """Runs ``cmd`` (same session as this process, so the whole benchmark shares one scheduler
    group on a machine with autogroup scheduling) until ready; always stops it (SIGINT, then
    SIGKILL)."""
    log_file = tempfile.NamedTemporaryFile(prefix=f"fedserve-bench-{name}-", suffix=".log")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        try:
            wait_http(ready_url, proc)
        except RuntimeError:
            log_file.seek(0)
            sys.stderr.write(log_file.read().decode(errors="replace")[-3000:])
            raise
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        log_file.close()


def median(values: Sequence[float]) -> float:
    vals = [v for v in values if v == v]
    return float(statistics.median(vals)) if vals else float("nan")


def progress(label: str, r: dict) -> None:
    print(
        f"  [{label}] {r['requests_per_s']:,.0f} req/s, {r['rows_per_s']:,.0f} images/s, "
        f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, errors {r['errors']}, client "
        f"{r['client_cores']:.2f} / server {r['server_cores']:.2f} / machine "
        f"{r['machine_busy_cores']:.2f} cores, load {os.getloadavg()[0]:.1f}",
        file=sys.stderr,
        flush=True,
    )


class Load:
    """One contender of a paired comparison: POSTs ``body`` to ``url``."""

    def __init__(
        self,
        label: str,
        url: str,
        body: bytes,
        header_length: int,
        rows: int,
        pids: Callable[[], Sequence[int]] | Sequence[int],
        *,
        computes: bool = True,
    ) -> None:
        self.label, self.url, self.body, self.hlen, self.rows, self.pids = (
            label,
            url,
            body,
            header_length,
            rows,
            pids,
        )
        #: False for the no-op endpoint: its latency does not grow with the model's run time
        self.computes = computes

    def run(self, warmup_s: float, window_s: float, windows: int) -> list[dict]:
        res = wrk_load(
            self.url,
            self.body,
            header_length=self.hlen,
            rows=self.rows,
            connections=CONNECTIONS,
            warmup_s=warmup_s,
            window_s=window_s,
            windows=windows,
            server_pids=self.pids,
        ).as_dict()
        per_window = res.pop("windows")
        out = []
        for w in per_window:
            r = dict(res, **w)
            cores = r["server_cores"]
            r["rows_per_core_s"] = r["rows_per_s"] / cores if cores > 0 else float("nan")
            out.append(r)
        progress(self.label, dict(res, rows_per_s=res["rows_per_s"]))
        return out


def steady_latency_s(rows: int, rows_per_s: float) -> float:
    """32 clients of ``rows`` rows at ``rows_per_s``: Little's law latency of the steady state."""
    return CONNECTIONS * rows / max(rows_per_s, 1.0)


def paired(
    contenders: dict[str, Load | Callable[[], dict]],
    rows: int,
    expected_rows_per_s: float,
    args: argparse.Namespace,
) -> dict[str, list[dict]]:
    """Each contender measured ``args.rounds`` times, interleaved round by round, one window per
    round after its own warm-up. All clients start at once, so the steady state (each request
    queued behind the others) is reached after one full turn of the queue: the warm-up is the
    longer of ``args.warmup`` and 1.5x the expected latency, and a long latency gets a longer
    window (up to 8 s) so that the window holds several turns' worth of completions."""
    latency = steady_latency_s(rows, expected_rows_per_s)
    out: dict[str, list[dict]] = {k: [] for k in contenders}
    for _ in range(args.rounds):
        for key, c in contenders.items():
            if not isinstance(c, Load):
                out[key].append(c())
            elif c.computes:
                window = max(args.window, min(latency, 8.0))
                out[key] += c.run(max(args.warmup, 1.5 * latency), window, 1)
            else:
                out[key] += c.run(args.warmup, args.window, 1)
    return out


def summary(samples: list[dict]) -> dict:
    keys = [k for k, v in samples[0].items() if isinstance(v, (int, float))]
    s = {k: median([r[k] for r in samples]) for k in keys}
    s["errors"] = int(sum(r.get("errors", 0) for r in samples))
    s["n"] = len(samples)
    return s


def paired_ratio(a: list[dict], b: list[dict], key: str, key_b: str | None = None) -> float:
    """Median of the per-round ratios a/b (rounds pair up in order)."""
    kb = key_b or key
    return median([x[key] / y[kb] for x, y in zip(a, b, strict=False) if y[kb] > 0])


# ---------------------------------------------------------------- models


def export_models(repo_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    import torch

    from server.export import export_and_publish
    from serving.repository import ModelRepository
    from task.config import ExportConfig
    from task.models import build_model

    repo = ModelRepository(repo_dir)
    info = {}
    for name in names:
        shape, classes = MODELS[name]
        torch.manual_seed(0)
        model = build_model(name, shape, classes)
        params = sum(p.numel() for p in model.parameters())
        res = export_and_publish(
            model,
            torch.randn(8, *shape),
            repo,
            name,
            {"round": 0, "metrics": {}},
            ExportConfig(max_batch_size=64, keep_last=1, keep_best=False),
        )
        meta = repo.load_metadata(name, res.version)
        info[name] = {
            "path": str(repo.model_path(name, res.version)),
            "shape": shape,
            "params": params,
            "input": meta["inputs"][0]["name"],
            "output": meta["outputs"][0]["name"],
        }
    return info


def bodies_for(info: dict[str, Any]) -> dict[int, tuple[bytes, int]]:
    out = {}
    for rows in BATCHES:
        x = np.random.default_rng(rows).standard_normal((rows, *info["shape"]))
        out[rows] = binary_body(x.astype(np.float32), info["input"], info["output"])
    return out


# ---------------------------------------------------------------- ceiling


def _session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def ceiling_layout(
    path: str, input_name: str, x: np.ndarray, sessions: int, threads: int, seconds: float
) -> dict[str, float]:
    """``sessions`` sessions of ``threads`` intra-op threads (onnxruntime defaults otherwise), each
    driven back to back by its own Python thread (run releases the GIL) until ``seconds`` have
    passed, and at least 10 runs' worth of time; every run started is counted and timed to its end,
    so a run of seconds (ResNet-18 at batch 64 on a shared core) does not bias the rate."""
    sess = [_session(path, threads) for _ in range(sessions)]
    feeds = {input_name: x}
    warm = []
    for s in sess:
        for _ in range(3):
            t0 = time.perf_counter()
            s.run(None, feeds)
            warm.append(time.perf_counter() - t0)
    seconds = min(max(seconds, 10 * float(np.median(warm))), 15.0)
    lat: list[list[float]] = [[] for _ in sess]
    barrier = threading.Barrier(len(sess) + 1)
    end = [0.0]

    def loop(i: int) -> None:
        s, out = sess[i], lat[i]
        barrier.wait()
        stop = end[0]
        while True:
            t0 = time.perf_counter()
            if t0 >= stop:
                return
            s.run(None, feeds)
            out.append(time.perf_counter() - t0)

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(len(sess))]
    for t in workers:
        t.start()
    cpu0 = time.process_time()
    t_start = time.perf_counter()
    end[0] = t_start + seconds
    barrier.wait()
    for t in workers:
        t.join()
    wall = time.perf_counter() - t_start
    cpu = time.process_time() - cpu0
    all_lat = np.array([v for lst in lat for v in lst]) * 1000
    rows = len(all_lat) * x.shape[0]
    return {
        "rows_per_s": rows / wall,
        "p50_ms": float(np.percentile(all_lat, 50)),
        "p99_ms": float(np.percentile(all_lat, 99)),
        "cores": cpu / wall,
        "rows_per_core_s": rows / cpu if cpu > 0 else float("nan"),
    }


def ceiling_once(info: dict[str, Any], rows: int, seconds: float) -> dict[str, Any]:
    """Both layouts once; the best (images/s) is the ceiling of this round."""
    x = np.random.default_rng(0).standard_normal((rows, *info["shape"])).astype(np.float32)
    layouts = {
        label: ceiling_layout(info["path"], info["input"], x, n, t, seconds)
        for label, n, t in LAYOUTS
    }
    best = max(layouts, key=lambda k: layouts[k]["rows_per_s"])
    out = {f"{label}/{k}": v for label, d in layouts.items() for k, v in d.items()}
    out.update(layouts[best])
    out["best_layout"] = best
    out["requests_per_s"] = out["rows_per_s"] / rows
    out["rows_per_core_s"] = max(d["rows_per_core_s"] for d in layouts.values())
    print(
        f"  [ceiling b{rows}] {out['rows_per_s']:,.0f} images/s ({best}); "
        f"load {os.getloadavg()[0]:.1f}",
        file=sys.stderr,
        flush=True,
    )
    return out


# ---------------------------------------------------------------- 1. our server and the no-op

NOOP_APP = '''
"""A no-op KServe-shaped endpoint: reads the body, answers pre-recorded bytes (by body size)."""
import json
import sys
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from starlette.responses import Response
from starlette.routing import Route

recorded = json.loads(Path(sys.argv[2]).read_text())
answers = {int(k): (bytes.fromhex(v[0]), v[1]) for k, v in recorded.items()}


async def infer(request):
    body = await request.body()
    payload, header_length = answers[len(body)]
    return Response(payload, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": header_length})


async def ready(request):
    return Response(b"{}", media_type="application/json")


app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
app.router.routes.append(Route("/v2/models/{name}/infer", infer, methods=["POST"]))
app.router.routes.append(Route("/v2/health/ready", ready, methods=["GET"]))
# the same call as serving/cli.py: uvicorn's defaults (uvloop + httptools here), one worker
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
'''


def our_server(repo: Path, model: str, extra: Sequence[str] = ()):
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "fedserve-serve"),
        f"repository={repo}",
        f"port={port}",
        "log_level=warning",
        f"models=[{model}]",
        *extra,
    ]
    base = f"http://127.0.0.1:{port}"
    return server_process(cmd, f"{base}/v2/models/{model}/ready", "ours"), base


def http_section(
    name: str, info: dict[str, Any], repo: Path, args: argparse.Namespace
) -> dict[str, Any]:
    bodies = bodies_for(info)
    raw: dict[str, Any] = {}
    ctx, base = our_server(repo, name)
    with ctx as ours, tempfile.TemporaryDirectory(prefix="fedserve-noop-") as tmp:
        url = f"{base}/v2/models/{name}/infer"
        answers = {}
        for body, hlen in bodies.values():
            status, headers, resp = post(url, body, hlen)
            assert status == 200, (status, resp[:200])
            answers[len(body)] = (resp.hex(), headers.get(HEADER) or headers.get(HEADER.lower()))
        Path(tmp, "answers.json").write_text(json.dumps(answers))
        Path(tmp, "noop_app.py").write_text(NOOP_APP)
        port = free_port()
        nbase = f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            str(Path(tmp, "noop_app.py")),
            str(port),
            str(Path(tmp, "answers.json")),
        ]
        with server_process(cmd, f"{nbase}/v2/health/ready", "noop") as noop:
            for rows in BATCHES:
                body, hlen = bodies[rows]
                # round 1's ceiling is measured first: it sets the warm-up of the loads
                ceilings = [ceiling_once(info, rows, args.ceiling_s)]
                first = ceilings[0]

                def ceiling_round(rows: int = rows, ceilings: list = ceilings) -> dict:
                    return ceilings.pop() if ceilings else ceiling_once(info, rows, args.ceiling_s)

                contenders = {
                    "ceiling": ceiling_round,
                    "ours": Load(f"{name} ours b{rows}", url, body, hlen, rows, [ours.pid]),
                    "noop": Load(
                        f"{name} no-op b{rows}",
                        f"{nbase}/v2/models/{name}/infer",
                        body,
                        hlen,
                        rows,
                        [noop.pid],
                        computes=False,
                    ),
                }
                res = paired(contenders, rows, first["rows_per_s"], args)
                raw[f"b{rows}"] = res
    return summarize_http(raw)


def summarize_http(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"raw": raw}
    for b in BATCHES:
        res = raw[f"b{b}"]
        s = {k: summary(v) for k, v in res.items()}
        s["best_layouts"] = [r["best_layout"] for r in res["ceiling"]]
        s["ratio_ceiling"] = paired_ratio(res["ours"], res["ceiling"], "rows_per_s")
        s["ratio_noop"] = paired_ratio(res["ours"], res["noop"], "requests_per_s")
        s["ratio_ceiling_per_core"] = s["ours"]["rows_per_core_s"] / s["ceiling"]["rows_per_core_s"]
        out[f"b{b}"] = s
    return out


# ---------------------------------------------------------------- 2. Ray Serve


def _ray_deployment(root: str):
    from ray import serve
    from starlette.requests import Request as StarletteRequest
    from starlette.responses import Response

    @serve.deployment(num_replicas=2, max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
    class OrtModel:
        """One onnxruntime session (1 intra-op thread) per replica; requests are the same binary
        KServe v2 bodies, decoded with serving.protocol, batched by @serve.batch up to 64 rows."""

        def __init__(self, path: str, input_name: str, output_name: str) -> None:
            if root not in sys.path:
                sys.path.insert(0, root)
            import onnxruntime as ort

            from serving.protocol import decode_request, encode_response

            self.decode, self.encode = decode_request, encode_response
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            self.input_name = input_name
            self.output_name = output_name

        @serve.batch(
            max_batch_size=64,
            batch_wait_timeout_s=0.001,
            batch_size_fn=lambda xs: sum(len(x) for x in xs),
        )
        async def predict(self, xs: list[np.ndarray]) -> list[np.ndarray]:
            x = xs[0] if len(xs) == 1 else np.concatenate(xs)
            y = self.session.run([self.output_name], {self.input_name: x})[0]
            out, offset = [], 0
            for part in xs:
                out.append(y[offset : offset + len(part)])
                offset += len(part)
            return out

        async def __call__(self, request: StarletteRequest) -> Response:
            body = await request.body()
            ireq = self.decode(body, request.headers.get(HEADER))
            y = await self.predict(ireq.inputs[self.input_name])
            payload, hlen = self.encode(
                "model", "1", {self.output_name: y}, [self.output_name], ireq
            )
            return Response(
                payload, media_type="application/octet-stream", headers={HEADER: str(hlen)}
            )

    return OrtModel


def _descendants() -> list[int]:
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]


def _rss_gb(pids: list[int]) -> float:
    import psutil

    total = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total / 2**30


def _wait_gone(pids: list[int], timeout: float) -> list[str]:
    """Processes of ``pids`` (this run's Ray processes) still alive after ``timeout``."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.name()}:{pid}")
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def ray_section(
    infos: dict[str, dict],
    repo: Path,
    expected: dict[str, dict[int, float]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    import ray
    from ray import serve

    out: dict[str, Any] = {}
    started = time.perf_counter()
    ray_pids: list[int] = []
    before = set(_descendants())
    try:
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            object_store_memory=256 * 2**20,
        )
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deployment = _ray_deployment(str(ROOT))
        for name, info in infos.items():
            bodies = bodies_for(info)
            serve.run(
                deployment.bind(info["path"], info["input"], info["output"]),
                name=name,
                route_prefix=f"/v2/models/{name}/infer",
            )
            ray_url = f"http://127.0.0.1:{port}/v2/models/{name}/infer"
            for rows in BATCHES:
                body, hlen = bodies[rows]
                status, _, resp = post(ray_url, body, hlen)
                assert status == 200, (status, resp[:200])
            if "startup_s" not in out:
                out["startup_s"] = time.perf_counter() - started
                ray_pids = sorted(set(_descendants()) - before)
                out["processes"] = len(ray_pids)
                out["rss_gb"] = _rss_gb(ray_pids)
            ctx, base = our_server(repo, name)
            with ctx as ours:
                url = f"{base}/v2/models/{name}/infer"

                def ray_procs(ours_pid: int = ours.pid) -> list[int]:
                    return sorted(set(_descendants()) - before - {ours_pid})

                for rows in BATCHES:
                    body, hlen = bodies[rows]
                    contenders = {
                        "ours": Load(f"{name} ours b{rows}", url, body, hlen, rows, [ours.pid]),
                        "ray": Load(f"{name} ray b{rows}", ray_url, body, hlen, rows, ray_procs),
                    }
                    out[f"{name}_b{rows}_raw"] = paired(
                        contenders, rows, expected[name][rows], args
                    )
            serve.delete(name)
    finally:
        ray_pids = sorted(set(ray_pids) | (set(_descendants()) - before))
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        out["leftover"] = _wait_gone(ray_pids, 30.0)
    for name in infos:
        for rows in BATCHES:
            raw = out.get(f"{name}_b{rows}_raw")
            if raw:
                out[f"{name}_b{rows}"] = {
                    "ours": summary(raw["ours"]),
                    "ray": summary(raw["ray"]),
                    "ratio": paired_ratio(raw["ray"], raw["ours"], "rows_per_s"),
                }
    return out


# ---------------------------------------------------------------- 3. policy

SLOW_SERVER = '''
"""fedserve-serve (serving.cli.serve) with engine e0 of every pool slowed: after each run it sleeps
(factor - 1) x the run time, so it is `factor` times slower without using more CPU."""
import json
import sys
import time

import serving.watcher
from serving import cli
from serving.pool import EnginePool

factor = float(sys.argv[1])


class SlowPool(EnginePool):
    def _default_factory(self, name):
        engine = super()._default_factory(name)
        if name.endswith("/e0"):
            run = engine.run

            def slow_run(feeds, _run=run):
                t0 = time.perf_counter()
                out = _run(feeds)
                time.sleep((factor - 1.0) * (time.perf_counter() - t0))
                return out

            engine.run = slow_run
        return engine


_init = serving.watcher.RepositoryWatcher.__init__


def _patched(self, *a, **kw):
    kw["pool_factory"] = SlowPool
    _init(self, *a, **kw)


serving.watcher.RepositoryWatcher.__init__ = _patched
cli.serve(json.loads(sys.argv[2]))
'''


def policy_section(
    name: str,
    info: dict[str, Any],
    repo: Path,
    expected: dict[int, float],
    args: argparse.Namespace,
) -> dict[str, Any]:
    bodies = bodies_for(info)
    out: dict[str, Any] = {}
    batches = [1] if name == "resnet18" and not args.policy_resnet_b64 else list(BATCHES)
    with (
        tempfile.TemporaryDirectory(prefix="fedserve-slow-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        script = Path(tmp, "slow_server.py")
        script.write_text(SLOW_SERVER)
        servers = {}
        for policy in ("least_loaded", "round_robin"):
            port = free_port()
            conf = {
                "repository": str(repo),
                "host": "127.0.0.1",
                "port": port,
                "log_level": "warning",
                "models": [name],
                "serving": {"policy": policy, "inline_max_ms": 0},
            }
            cmd = [sys.executable, str(script), str(args.slow_factor), json.dumps(conf)]
            base = f"http://127.0.0.1:{port}"
            proc = stack.enter_context(
                server_process(cmd, f"{base}/v2/models/{name}/ready", policy)
            )
            servers[policy] = (f"{base}/v2/models/{name}/infer", proc)
        for rows in batches:
            body, hlen = bodies[rows]
            contenders = {
                policy: Load(f"{name} {policy} b{rows}", url, body, hlen, rows, [proc.pid])
                for policy, (url, proc) in servers.items()
            }
            # warm-up and window sized for round-robin, the slower one: its queue builds up on the
            # slow engine over several of that engine's batches (~0.2 x the ceiling here)
            raw = paired(contenders, rows, expected[rows] * 0.15, args)
            out[f"b{rows}"] = {
                "raw": raw,
                "least_loaded": summary(raw["least_loaded"]),
                "round_robin": summary(raw["round_robin"]),
                "ratio_p99": paired_ratio(raw["least_loaded"], raw["round_robin"], "p99_ms"),
            }
    return out


# ---------------------------------------------------------------- 4. dispatcher overhead


class NullEngine:
    """Looks like serving.engine.Engine to a Worker; run returns its input (no model)."""

    def __init__(self, name: str, signature: Any) -> None:
        self.name = name
        self.signature = signature
        self.providers = ["none"]
        self.output_names = ["y"]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": feeds["x"]}

    def close(self) -> None:
        pass


def _null_pool(**settings: Any):
    from serving.engine import ModelSignature
    from serving.pool import EnginePool, PoolSettings

    sig = ModelSignature.build(
        [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
        64,
    )
    base = {"instances": 2, "providers": "cpu", "run_timeout_s": 0}
    return EnginePool(
        "null",
        1,
        "/nonexistent.onnx",
        sig,
        PoolSettings(**(base | settings)),
        engine_factory=lambda name: NullEngine(name, sig),
    )


def _pcts(samples: list[float]) -> dict[str, float]:
    a = np.array(samples) * 1e6
    return {
        "p50_us": float(np.percentile(a, 50)),
        "p99_us": float(np.percentile(a, 99)),
        "n": len(a),
    }


async def _async_samples(pool: Any, feeds: dict, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        rows = pool.signature.validate(feeds)
        req = await pool.infer_async(feeds, rows)
        assert req.error is None
        samples.append(time.perf_counter() - t0)
    return samples


async def _capacity(pool: Any, feeds: dict, seconds: float) -> dict[str, float]:
    stop = time.perf_counter() + seconds
    done = [0]

    async def client() -> None:
        while time.perf_counter() < stop:
            await pool.infer_async(feeds, 1)
            done[0] += 1

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(CONNECTIONS)))
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return {"requests_per_s": done[0] / wall, "cpu_us_per_request": cpu / max(1, done[0]) * 1e6}


def dispatch_section(args: argparse.Namespace) -> dict[str, Any]:
    n = args.dispatch_n
    feeds = {"x": np.zeros((1, 4), np.float32)}
    out: dict[str, Any] = {}
    pool = _null_pool(max_queue_delay_ms=0.0, inline_max_ms=0.0)
    try:
        pool.infer(feeds)
        for policy in ("least_loaded", "round_robin"):
            pool.dispatcher.policy = policy
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                pool.dispatcher.select(pool.workers)
                samples.append(time.perf_counter() - t0)
            out[f"select_{policy}"] = _pcts(samples)
        pool.dispatcher.policy = "least_loaded"
        samples = []
        for _ in range(n):
            t0 = time.perf_counter()
            pool.infer(feeds)
            samples.append(time.perf_counter() - t0)
        out["blocking_queued"] = _pcts(samples)
        out["async_queued"] = _pcts(asyncio.run(_async_samples(pool, feeds, n)))
    finally:
        pool.close(5)
    pool = _null_pool(max_queue_delay_ms=0.0)  # default inline_max_ms=1
    try:
        pool.infer(feeds)  # the inline check needs one measured run
        out["async_inline"] = _pcts(asyncio.run(_async_samples(pool, feeds, n)))
    finally:
        pool.close(5)
    pool = _null_pool(inline_max_ms=0.0)  # default max_queue_delay_ms=1
    try:
        out["capacity_32_concurrent"] = asyncio.run(_capacity(pool, feeds, 2.0))
    finally:
        pool.close(5)
    return out


# ---------------------------------------------------------------- report


def fmt(v: float, digits: int = 0) -> str:
    return "-" if v != v else f"{v:,.{digits}f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    out = [line, "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(), line]
    for r in rows:
        cells = zip(r, widths, strict=True)
        out.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(cells)))
    out.append(line)
    return "\n".join(out)


def load_cells(r: dict) -> list[str]:
    return [
        fmt(r["requests_per_s"]),
        fmt(r["rows_per_s"]),
        fmt(r["p50_ms"], 1),
        fmt(r["p99_ms"], 1),
        str(r.get("errors", 0)),
        f"{r['client_cores']:.2f}",
        f"{r['server_cores']:.2f}",
        fmt(r["rows_per_core_s"]),
    ]


LOAD_HEADERS = [
    "req/s",
    "images/s",
    "p50 ms",
    "p99 ms",
    "errors",
    "client cores",
    "server cores",
    "img/server core-s",
]


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"# Serving benchmark ({time.strftime('%Y-%m-%d %H:%M')})",
        f"machine: {results['machine']}",
        f"command: {results['command']}",
        f"load: wrk, {CONNECTIONS} closed-loop connections, binary KServe v2 bodies, medians of "
        f"{args.rounds} interleaved rounds; each round: a warm-up of max({args.warmup:g} s, 1.5 x "
        f"the expected latency), then a window of max({args.window:g} s, min(latency, 8 s))",
        "",
    ]
    for name, res in results["models"].items():
        info = res["info"]
        lines.append(f"## {name} ({info['params'] / 1e6:.2f}M params, input {list(info['shape'])})")
        if "http" in res:
            h = res["http"]
            lines.append("")
            lines.append(
                "ceiling (raw onnxruntime in-process, best layout per round; its p50/p99: one "
                "onnxruntime call) vs ours vs a no-op endpoint (same uvicorn settings, 1 worker, "
                "same bodies and answers)"
            )
            rows = []
            for b in BATCHES:
                s = h[f"b{b}"]
                c = s["ceiling"]
                layouts = ", ".join(sorted(set(s["best_layouts"])))
                rows.append(
                    [
                        f"ceiling, batch {b} ({layouts})",
                        "-",
                        fmt(c["rows_per_s"]),
                        fmt(c["p50_ms"], 2),
                        fmt(c["p99_ms"], 2),
                        "-",
                        "-",
                        f"{c['cores']:.2f}",
                        fmt(c["rows_per_core_s"]),
                        "1.00",
                        "-",
                    ]
                )
                o = s["ours"]
                cells = load_cells(o)
                rows.append(
                    [
                        f"ours, batch {b}",
                        *cells,
                        f"{s['ratio_ceiling']:.2f}",
                        f"{s['ratio_noop']:.2f}",
                    ]
                )
                z = s["noop"]
                rows.append([f"no-op, batch {b}", *load_cells(z), "-", "1.00"])
            lines.append(
                table(["contender", *LOAD_HEADERS, "x ceiling img/s", "x no-op req/s"], rows)
            )
            s1, s64 = h["b1"], h["b64"]
            w64, c64 = s64["ratio_ceiling"], s64["ratio_ceiling_per_core"]
            lines.append(
                f"target batch 64 >= 0.8 x ceiling: images/s {w64:.2f} ({met(w64 >= 0.8)}); images "
                f"per server core-second {c64:.2f} ({met(c64 >= 0.8)}) (ceiling per core: its most "
                f"efficient layout; batch 1 per core: {s1['ratio_ceiling_per_core']:.2f})"
            )
            bound = max(s1["ceiling"]["rows_per_core_s"], s64["ceiling"]["rows_per_core_s"])
            noop_core = s1["noop"]["rows_per_core_s"]
            lines.append(
                f"target batch 1 >= 0.6 x no-op req/s: {s1['ratio_noop']:.2f} "
                f"({met(s1['ratio_noop'] >= 0.6)}); any server's bound here: onnxruntime alone "
                f"does {bound:,.0f} images per core-second at its best batch size, "
                f"{bound / noop_core:.2f} x the no-op's {noop_core:,.0f} requests per core-second"
            )
        ray = results.get("ray", {})
        if f"{name}_b1" in ray:
            lines.append("")
            lines.append(
                f"ours vs Ray Serve (2 onnxruntime replicas, @serve.batch <= 64 rows, 1 ms wait); "
                f"Ray: {ray.get('processes', '?')} processes, "
                f"{ray.get('rss_gb', float('nan')):.1f} GB "
                f"RSS, first answer {ray.get('startup_s', float('nan')):.0f} s after ray.init"
            )
            rows = []
            verdict = []
            for b in BATCHES:
                r = ray[f"{name}_b{b}"]
                rows.append([f"ours, batch {b}", *load_cells(r["ours"]), "1.00"])
                rows.append([f"Ray Serve, batch {b}", *load_cells(r["ray"]), f"{r['ratio']:.2f}"])
                ok = (
                    r["ours"]["rows_per_s"] > r["ray"]["rows_per_s"]
                    and r["ours"]["p99_ms"] < r["ray"]["p99_ms"]
                )
                verdict.append(f"batch {b}: {met(ok)}")
            lines.append(table(["server", *LOAD_HEADERS, "x ours img/s"], rows))
            lines.append("target: ours higher throughput and lower p99: " + ", ".join(verdict))
        if "policy" in res:
            p = res["policy"]
            lines.append("")
            lines.append(
                f"least-loaded vs round-robin: 2 engines, e0 slowed {args.slow_factor:g}x "
                "(sleeps), "
                "inline runs off"
            )
            rows = []
            verdict = []
            for b in BATCHES:
                if f"b{b}" not in p:
                    continue
                s = p[f"b{b}"]
                for policy in ("least_loaded", "round_robin"):
                    ratio = f"{s['ratio_p99']:.2f}" if policy == "least_loaded" else "1.00"
                    rows.append([f"{policy}, batch {b}", *load_cells(s[policy]), ratio])
                verdict.append(f"batch {b}: {s['ratio_p99']:.2f} ({met(s['ratio_p99'] <= 1 / 3)})")
            lines.append(table(["policy", *LOAD_HEADERS, "p99 / RR p99"], rows))
            lines.append("target: least-loaded p99 <= 1/3 of round-robin: " + ", ".join(verdict))
        lines.append("")
    if "dispatch" in results:
        d = results["dispatch"]
        lines.append(
            "## dispatcher overhead in-process (null engine: run returns its input; 2 workers)"
        )
        rows = [
            ["Dispatcher.select, least_loaded", d["select_least_loaded"]],
            ["Dispatcher.select, round_robin", d["select_round_robin"]],
            ["pool.infer, blocking caller (queue, worker thread, wake-up)", d["blocking_queued"]],
            ["await pool.infer_async, the API's path, queued", d["async_queued"]],
            ["await pool.infer_async, the API's path, inline on an idle engine", d["async_inline"]],
        ]
        lines.append(
            table(
                ["path (one request at a time, max_queue_delay 0)", "p50 us", "p99 us"],
                [[label, fmt(v["p50_us"], 1), fmt(v["p99_us"], 1)] for label, v in rows],
            )
        )
        cap = d["capacity_32_concurrent"]
        lines.append(
            f"32 concurrent callers, queued path, default 1 ms batching delay: "
            f"{cap['requests_per_s']:,.0f} req/s, {cap['cpu_us_per_request']:.0f} us CPU per "
            "request (all threads)"
        )
        p50 = d["async_queued"]["p50_us"]
        lines.append(f"target: p50 < 100 us (API path, queued): {p50:.0f} us ({met(p50 < 100)})")
    if "ray" in results:
        left = results["ray"].get("leftover", [])
        lines.append("")
        lines.append(
            "Ray after serve.shutdown(); ray.shutdown(): "
            + (
                "no process of this run left (raylet, gcs_server, workers gone)"
                if not left
                else f"STILL ALIVE: {left}"
            )
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="cnn,resnet18")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"of {SECTIONS}")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (repeats)")
    ap.add_argument("--window", type=float, default=3.0, help="seconds measured per round")
    ap.add_argument("--warmup", type=float, default=1.0, help="minimum warm-up seconds")
    ap.add_argument("--ceiling-s", type=float, default=2.0, help="seconds per ceiling layout")
    ap.add_argument("--slow-factor", type=float, default=4.0)
    ap.add_argument("--policy-resnet-b64", action="store_true", help="also ResNet batch 64")
    ap.add_argument("--dispatch-n", type=int, default=20000)
    ap.add_argument("--out", default=None, help="default benchmarks/results/serving.json")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: cnn only, 1 round of 1 s windows (results in serving-quick.json)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.rounds, args.window = "cnn", 1, 1.0
        args.ceiling_s, args.dispatch_n = 0.5, 2000
    if args.out is None:
        name = "serving-quick.json" if args.quick else "serving.json"
        args.out = str(HERE / "results" / name)
    logging.basicConfig(level=logging.WARNING)
    names = [m for m in args.models.split(",") if m]
    sections = set(args.sections.split(","))
    if args.skip_ray:
        sections.discard("ray")
    if sections - set(SECTIONS) or set(names) - set(MODELS):
        ap.error(f"sections are {SECTIONS}, models {tuple(MODELS)}")
    if sections & {"http", "ray", "policy"} and not wrk_available():
        ap.error("wrk is needed for the load sections: apt-get install wrk")
    results: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join(
            [".venv/bin/python benchmarks/serving_bench.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "models": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="fedserve-bench-"))
    try:
        repo = tmp / "repo"
        infos = export_models(repo, names) if sections - {"dispatch"} else {}
        expected: dict[str, dict[int, float]] = {}
        for name, info in infos.items():
            res: dict[str, Any] = {"info": info}
            results["models"][name] = res
            if "http" in sections:
                res["http"] = http_section(name, info, repo, args)
                expected[name] = {b: res["http"][f"b{b}"]["ceiling"]["rows_per_s"] for b in BATCHES}
            else:
                expected[name] = {
                    b: ceiling_once(info, b, args.ceiling_s)["rows_per_s"] for b in BATCHES
                }
            if "policy" in sections:
                res["policy"] = policy_section(name, info, repo, expected[name], args)
        if "ray" in sections and infos:
            results["ray"] = ray_section(infos, repo, expected, args)
        if "dispatch" in sections:
            results["dispatch"] = dispatch_section(args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = report(results, args)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results["report"] = results["table"] = text
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nresults: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
