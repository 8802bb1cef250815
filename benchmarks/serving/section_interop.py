"""Section ``interop``: our HTTP and gRPC front ends vs NVIDIA Triton's (through PyTriton) and the
raw onnxruntime ceiling, per batch size, measured in interleaved rounds.

Contenders, each under 32 requests in flight of the same binary KServe v2 request (HTTP: wrk, 32
connections; gRPC: h2load, 4 connections x 8 streams, :mod:`benchmarks.serving.grpc_load`):

* ``ceiling``: raw onnxruntime in this process (:mod:`benchmarks.serving.ceiling`);
* ``ours http`` / ``ours grpc``: one ``fedserve-serve`` (default config: one engine per core,
  dynamic batching up to 64 rows with a 1 ms delay) serving both;
* ``ours http fN`` / ``ours grpc fN`` (``--frontends N``, N > 1): a second ``fedserve-serve``
  with ``serving.frontends=N`` (front-end processes on the same ports, one engine pool);
* ``triton http`` / ``triton grpc``: Triton 2.x through PyTriton, 2 model instances of one
  1-thread onnxruntime session each, max_batch_size 64, dynamic batching with a 1 ms delay
  (:mod:`benchmarks.serving.triton`).

The targets (issue 16): batch 1: ours >= 1.5x Triton's req/s with p99 <= Triton's, on HTTP and on
gRPC; batch 64: ours >= 0.9x the ceiling; gRPC batch 1 >= HTTP batch 1.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.serving.ceiling import ceiling_rounds
from benchmarks.serving.config import BATCHES
from benchmarks.serving.grpc_load import GrpcLoad, check_target, infer_frame
from benchmarks.serving.models import bodies_for
from benchmarks.serving.paired import Load, paired, paired_ratio, summary
from benchmarks.serving.servers import our_server
from benchmarks.serving.triton import triton_server
from server.processes import free_port
from serving.v2_client import V2Client

CONTENDERS = ("ceiling", "ours http", "ours grpc", "triton http", "triton grpc")


def interop_section(
    name: str, info: dict[str, Any], repo: Path, args: argparse.Namespace
) -> dict[str, Any]:
    bodies = bodies_for(info)
    frames = {
        rows: infer_frame(
            name,
            info["input"],
            info["output"],
            np.random.default_rng(rows).standard_normal((rows, *info["shape"])).astype(np.float32),
        )
        for rows in BATCHES
    }
    grpc_port = free_port()
    ctx, base = our_server(
        repo, name, [f"serving.providers={args.providers}", f"serving.grpc_port={grpc_port}"]
    )
    raw: dict[str, Any] = {}
    frontends = getattr(args, "frontends", 1)
    with contextlib.ExitStack() as stack:
        ours = stack.enter_context(ctx)
        multi: dict[str, Any] = {}
        if frontends > 1:
            multi_grpc = free_port()
            mctx, mbase = our_server(
                repo,
                name,
                [f"serving.providers={args.providers}", f"serving.grpc_port={multi_grpc}",
                 f"serving.frontends={frontends}"],
            )  # fmt: skip
            mproc = stack.enter_context(mctx)
            multi = {"base": mbase, "grpc": f"127.0.0.1:{multi_grpc}", "proc": mproc}
        triton, tbase, tgrpc = stack.enter_context(triton_server(info, name))
        ours_grpc = f"127.0.0.1:{grpc_port}"
        for http_base in (base, tbase, *([multi["base"]] if multi else [])):
            with V2Client(http_base, timeout=120.0) as client:
                for body, hlen in bodies.values():
                    answer = client.post(f"/v2/models/{name}/infer", body, hlen)
                    assert answer.status == 200, (http_base, answer.status, answer.body[:200])
        for address in (ours_grpc, tgrpc, *([multi["grpc"]] if multi else [])):
            for frame in frames.values():
                check_target(address, frame)
        triton_pids = lambda: [triton.pid, *_children(triton.pid)]  # noqa: E731
        for rows in BATCHES:
            body, hlen = bodies[rows]
            first, ceiling_round = ceiling_rounds(info, rows, args.ceiling_s, args.providers)

            path = f"/v2/models/{name}/infer"
            contenders = {
                "ceiling": ceiling_round,
                "ours http": Load(f"{name} ours http b{rows}", base + path, body, hlen, rows,
                                  [ours.pid]),
                "ours grpc": GrpcLoad(f"{name} ours grpc b{rows}", ours_grpc, frames[rows], rows,
                                      [ours.pid]),
                "triton http": Load(f"{name} triton http b{rows}", tbase + path, body, hlen, rows,
                                    triton_pids),
                "triton grpc": GrpcLoad(f"{name} triton grpc b{rows}", tgrpc, frames[rows], rows,
                                        triton_pids()),
            }  # fmt: skip
            if multi:
                f = f"f{frontends}"
                family = lambda: [multi["proc"].pid, *_children(multi["proc"].pid)]  # noqa: E731
                contenders[f"ours http {f}"] = Load(
                    f"{name} ours http {f} b{rows}", multi["base"] + path, body, hlen, rows, family
                )
                contenders[f"ours grpc {f}"] = GrpcLoad(
                    f"{name} ours grpc {f} b{rows}", multi["grpc"], frames[rows], rows, family()
                )
            raw[f"b{rows}"] = paired(contenders, rows, first["rows_per_s"], args)
    return summarize_interop(raw)


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def summarize_interop(raw: dict[str, Any]) -> dict[str, Any]:
    """Per batch size: each contender's medians and the paired ratios the targets need."""
    out: dict[str, Any] = {"raw": raw}
    for b in BATCHES:
        res = raw[f"b{b}"]
        s: dict[str, Any] = {k: summary(v) for k, v in res.items()}
        for proto in ("http", "grpc"):
            s[f"{proto}_vs_triton"] = paired_ratio(
                res[f"ours {proto}"], res[f"triton {proto}"], "requests_per_s"
            )
            s[f"{proto}_vs_ceiling"] = paired_ratio(
                res[f"ours {proto}"], res["ceiling"], "rows_per_s"
            )
        s["grpc_vs_http"] = paired_ratio(res["ours grpc"], res["ours http"], "requests_per_s")
        for key in res:  # the front-end processes' contenders, when run
            if key.startswith("ours ") and len(key.split()) == 3:
                proto = key.split()[1]
                s[f"{key} vs triton"] = paired_ratio(
                    res[key], res[f"triton {proto}"], "requests_per_s"
                )
        out[f"b{b}"] = s
    return out
