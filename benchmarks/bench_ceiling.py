"""The ceiling: raw onnxruntime in this process, no HTTP, on the same model and batch.

Two layouts are tried each round, one session x 2 intra-op threads and two 1-thread sessions
driven by two threads; the better one (images/s) is that round's ceiling.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

import numpy as np

#: (label, sessions, intra-op threads per session)
LAYOUTS = (("1 session x 2 threads", 1, 2), ("2 sessions x 1 thread", 2, 1))


def _session(path: str, threads: int) -> Any:
    """An ``onnxruntime.InferenceSession`` on CPU with ``threads`` intra-op threads."""
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
