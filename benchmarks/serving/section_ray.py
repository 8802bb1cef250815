"""Section 2, ``ray``: our server vs Ray Serve under the same load.

Ray Serve runs 2 onnxruntime replicas of 1 thread each, batching with ``@serve.batch`` up to 64
rows with a 1 ms wait and ``max_ongoing_requests=64``, decoding and encoding the same binary
KServe v2 bodies with ``serving.protocol``. Its startup time, process count and RSS are recorded,
and after shutdown the processes of this run that are still alive.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import ROOT
from benchmarks.serving.config import BATCHES
from benchmarks.serving.models import bodies_for
from benchmarks.serving.paired import Load, paired, paired_ratio, summary
from benchmarks.serving.servers import our_server
from server.processes import free_port
from serving.protocol import HEADER_LENGTH
from serving.v2_client import V2Client


def _replica_env() -> dict[str, Any]:
    """The replicas' runtime env: the repository root on ``PYTHONPATH``, so that they import
    this checkout's ``serving`` whatever directory the benchmark was started from (Ray itself
    only adds the driver's working directory to its workers' path)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def _ray_deployment() -> Any:
    """The Ray Serve deployment class (imports ray)."""
    from ray import serve
    from starlette.requests import Request as StarletteRequest
    from starlette.responses import Response

    @serve.deployment(
        num_replicas=2,
        max_ongoing_requests=64,
        ray_actor_options={"num_cpus": 1, "runtime_env": _replica_env()},
    )
    class OrtModel:
        """One onnxruntime session (1 intra-op thread) per replica; requests are the same binary
        KServe v2 bodies, decoded with serving.protocol, batched by @serve.batch up to 64 rows."""

        def __init__(self, path: str, input_name: str, output_name: str) -> None:
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
            ireq = self.decode(body, request.headers.get(HEADER_LENGTH))
            y = await self.predict(ireq.inputs[self.input_name])
            payload, hlen = self.encode(
                "model", "1", {self.output_name: y}, [self.output_name], ireq
            )
            return Response(
                payload,
                media_type="application/octet-stream",
                headers={HEADER_LENGTH: str(hlen)},
            )

    return OrtModel


def _descendants() -> list[int]:
    """Pids of every descendant process of this one."""
    import psutil

    return [p.pid for p in psutil.Process().children(recursive=True)]


def _rss_gb(pids: list[int]) -> float:
    """Total resident memory of ``pids`` in GiB (gone processes count 0)."""
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
    """Starts a local Ray (2 CPUs) and Serve, deploys each model of ``infos`` next to our server
    and measures the two in interleaved rounds per batch size (``expected``: the ceiling's images/s
    per model and batch, which sizes the warm-ups); always shuts Ray down and reports what is left.
    Per model and batch: raw samples, medians and the paired ratio Ray/ours of images/s."""
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
        deployment = _ray_deployment()
        for name, info in infos.items():
            bodies = bodies_for(info)
            serve.run(
                deployment.bind(info["path"], info["input"], info["output"]),
                name=name,
                route_prefix=f"/v2/models/{name}/infer",
            )
            ray_url = f"http://127.0.0.1:{port}/v2/models/{name}/infer"
            with V2Client(f"127.0.0.1:{port}", timeout=120.0) as client:
                for rows in BATCHES:
                    body, hlen = bodies[rows]
                    answer = client.post(f"/v2/models/{name}/infer", body, hlen)
                    assert answer.status == 200, (answer.status, answer.body[:200])
            if "startup_s" not in out:
                out["startup_s"] = time.perf_counter() - started
                ray_pids = sorted(set(_descendants()) - before)
                out["processes"] = len(ray_pids)
                out["rss_gb"] = _rss_gb(ray_pids)
            ctx, base = our_server(repo, name, [f"serving.providers={args.providers}"])
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
