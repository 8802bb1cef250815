"""Serving benchmark: our KServe v2 server vs the hardware, a no-op endpoint and Ray Serve.

    .venv/bin/python -m benchmarks.serving.bench                        # everything, both models
    .venv/bin/python -m benchmarks.serving.bench --models cnn --sections http,policy
    .venv/bin/python -m benchmarks.serving.bench --skip-ray

For the MNIST ``cnn`` (FedAvg paper CNN, 1x28x28, 10 classes) and ``resnet18`` (3x32x32), random
weights, exported through ``server/export.py`` into a temporary model repository, it prints:

1. **http**: the ceiling (raw onnxruntime in this process: the better of one session x 2 intra-op
   threads and two 1-thread sessions driven by two threads) vs our server (``fedserve-serve`` with
   its default config: one uvicorn process, one engine per core) under 32 closed-loop connections
   sending binary-v2 requests of 1 and of 64 rows, and vs a no-op FastAPI endpoint on the same
   uvicorn settings (uvloop + httptools, one worker) that reads the same body and answers the same
   bytes;
2. **interop**: our HTTP and gRPC front ends next to NVIDIA Triton's (PyTriton, its own venv) and
   the raw onnxruntime ceiling (:mod:`benchmarks.serving.section_interop`; gRPC load from h2load);
3. **ray**: the same load against Ray Serve (2 onnxruntime replicas of 1 thread, ``@serve.batch``
   of up to 64 rows with a 1 ms wait, ``max_ongoing_requests=64``), paired with our server;
4. **policy**: least-loaded vs round-robin when one of the two engines is 4x slower (it sleeps
   3x its run time after each run: slower without taking CPU from the others; inline runs off so
   a sleeping engine never holds the event loop);
5. **dispatch**: the dispatcher's overhead per request in-process, with a null engine (no model).

Method. The machine is small (2 cores) and shared, so the compared measurements are interleaved:
each round measures every contender once (ceiling, ours, no-op; or ours, Ray; or least-loaded,
round-robin) for one window after its own warm-up, and the tables give medians over the rounds
(``--rounds``, default 3) and the median of the per-round ratios. A load whose steady-state latency
is seconds (ResNet-18 with 32 x 64-row requests: ~2,000 queued images, ~15 s) gets a warm-up of 1.5x
that latency and a window of up to 8 s, so its rounds take ~30 s each. Load comes from wrk
(``load``); latency is per request, send to last byte. Client, server and machine CPU
are reported in cores so the reader can see who was the bottleneck, and "images per server
core-second" is given next to images/s because it does not depend on how much of the shared machine
the run got. Results also go to ``--out`` (default ``benchmarks/results/serving.json``).

This module is the CLI (options, orchestration, output); the work is in its neighbours in
``benchmarks.serving``: ``config`` (constants), ``models`` (export, request bodies), ``servers``
(the server subprocesses: ``noop_app``, ``slow_server``), ``load`` (wrk), ``paired`` (interleaved
measurement, medians, ratios), ``ceiling``, ``section_http``, ``section_ray``, ``section_policy``,
``section_dispatch`` (one section each) and ``tables`` (the report).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS
from benchmarks.serving.ceiling import ceiling_once
from benchmarks.serving.config import BATCHES, MODELS, SECTIONS
from benchmarks.serving.grpc_load import h2load_available
from benchmarks.serving.load import wrk_available
from benchmarks.serving.models import export_models
from benchmarks.serving.section_dispatch import dispatch_section
from benchmarks.serving.section_http import http_section
from benchmarks.serving.section_interop import interop_section
from benchmarks.serving.section_policy import policy_section
from benchmarks.serving.section_ray import ray_section
from benchmarks.serving.tables import report

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


def machine(providers: str) -> str:
    """One line about this machine and its load, for the report."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import onnxruntime as ort

    return (
        f"{len(os.sched_getaffinity(0))} cores ({cpu}), onnxruntime {ort.__version__} "
        f"{'CUDA' if providers == 'cuda' else 'CPU'}ExecutionProvider{_gpu_name(providers)}, "
        f"Python {platform.python_version()}; load average at start "
        f"{os.getloadavg()[0]:.1f} (the machine is shared with other jobs)"
    )


def _gpu_name(providers: str) -> str:
    """`` on <GPU name>`` from nvidia-smi for a CUDA run ("" otherwise, or if it cannot tell)."""
    if providers != "cuda" or not shutil.which("nvidia-smi"):
        return ""
    import subprocess

    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f" on {out.splitlines()[0]}" if out else ""


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv``, runs the chosen sections, prints the report, writes ``--out``."""
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
    ap.add_argument(
        "--providers",
        choices=("cpu", "cuda"),
        default="cpu",
        help="onnxruntime provider of our server's engines, the ceiling and the slowed servers",
    )
    ap.add_argument(
        "--frontends",
        type=int,
        default=1,
        help="interop: also a fedserve-serve with serving.frontends=N (N > 1) as contenders",
    )
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
        args.out = str(RESULTS / name)
    logging.basicConfig(level=logging.WARNING)
    names = [m for m in args.models.split(",") if m]
    sections = set(args.sections.split(","))
    if args.skip_ray:
        sections.discard("ray")
    if sections - set(SECTIONS) or set(names) - set(MODELS):
        ap.error(f"sections are {SECTIONS}, models {tuple(MODELS)}")
    if args.providers == "cuda" and "ray" in sections:
        ap.error("--providers cuda: the ray section runs Ray Serve on the CPU only; add --skip-ray")
    if sections & {"http", "interop", "ray", "policy"} and not wrk_available():
        ap.error("wrk is needed for the load sections: apt-get install wrk")
    if "interop" in sections and not h2load_available():
        ap.error("the interop section's gRPC load needs h2load: apt-get install nghttp2-client")
    given = sys.argv[1:] if argv is None else argv
    results: dict[str, Any] = {
        "machine": machine(args.providers),
        "command": " ".join([".venv/bin/python -m benchmarks.serving.bench", *given]),
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
                    b: ceiling_once(info, b, args.ceiling_s, args.providers)["rows_per_s"]
                    for b in BATCHES
                }
            if "interop" in sections:
                res["interop"] = interop_section(name, info, repo, args)
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
