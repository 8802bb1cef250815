"""The ceiling: raw onnxruntime in this process, no HTTP, on the same model and batch.

Two layouts are tried each round and the better one (images/s) is that round's ceiling. On the
CPU (``--providers cpu``): one session x C intra-op threads and C 1-thread sessions driven by C
threads, C = the usable cores (2 here). On a GPU (``--providers cuda``): one and two CUDA sessions
(the serving pool's default is 2 engines on a GPU), each driven by its own thread.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider"]}


def layouts(providers: str) -> tuple[tuple[str, int, int], ...]:
    """(label, sessions, intra-op threads per session) of the layouts tried on ``providers``."""
    if providers == "cuda":
        return (("1 CUDA session", 1, 1), ("2 CUDA sessions", 2, 1))
    cores = len(os.sched_getaffinity(0))
    return (
        (f"1 session x {cores} threads", 1, cores),
        (f"{cores} sessions x 1 thread", cores, 1),
    )


def _session(path: str, threads: int, providers: str) -> Any:
    """An ``onnxruntime.InferenceSession`` on ``providers`` with ``threads`` intra-op threads;
    a CUDA session that did not obtain the CUDA provider is an error, not a silent CPU run."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, opts, providers=PROVIDERS[providers])
    if session.get_providers()[0] != PROVIDERS[providers][0]:
        raise RuntimeError(f"asked for {providers}, obtained {session.get_providers()}")
    return session


def ceiling_layout(
    path: str,
    input_name: str,
    x: np.ndarray,
    sessions: int,
    threads: int,
    seconds: float,
    providers: str = "cpu",
) -> dict[str, float]:
    """``sessions`` sessions of ``threads`` intra-op threads (onnxruntime defaults otherwise), each
    driven back to back by its own Python thread (run releases the GIL) until ``seconds`` have
    passed, and at least 10 runs' worth of time; every run started is counted and timed to its end,
    so a run of seconds (ResNet-18 at batch 64 on a shared core) does not bias the rate."""
    sess = [_session(path, threads, providers) for _ in range(sessions)]
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


def ceiling_once(
    info: dict[str, Any], rows: int, seconds: float, providers: str = "cpu"
) -> dict[str, Any]:
    """Both layouts once; the best (images/s) is the ceiling of this round."""
    x = np.random.default_rng(0).standard_normal((rows, *info["shape"])).astype(np.float32)
    tried = {
        label: ceiling_layout(info["path"], info["input"], x, n, t, seconds, providers)
        for label, n, t in layouts(providers)
    }
    best = max(tried, key=lambda k: tried[k]["rows_per_s"])
    out = {f"{label}/{k}": v for label, d in tried.items() for k, v in d.items()}
    out.update(tried[best])
    out["best_layout"] = best
    out["requests_per_s"] = out["rows_per_s"] / rows
    out["rows_per_core_s"] = max(d["rows_per_core_s"] for d in tried.values())
    print(
        f"  [ceiling b{rows}] {out['rows_per_s']:,.0f} images/s ({best}); "
        f"load {os.getloadavg()[0]:.1f}",
        file=sys.stderr,
        flush=True,
    )
    return out


def ceiling_rounds(
    info: dict[str, Any], rows: int, seconds: float, providers: str = "cpu"
) -> tuple[dict[str, Any], Callable[[], dict[str, Any]]]:
    """Round 1's ceiling, measured now (its images/s set the warm-up of the loads), and the
    contender that returns it for round 1 and measures anew in every later round."""
    first = ceiling_once(info, rows, seconds, providers)
    unused = [first]

    def next_round() -> dict[str, Any]:
        return unused.pop() if unused else ceiling_once(info, rows, seconds, providers)

    return first, next_round
