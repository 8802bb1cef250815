"""Server memory and throughput aggregating 100 ``resnet18`` updates: ours vs Flower's FedAvg.

Memory. Each side runs in a fresh subprocess that never imports torch (the model's shapes come from
the parent), so its baseline is numpy + flwr + the global arrays. After the baseline the peak RSS
is reset (``/proc/self/clear_refs``) and tracemalloc started; then

* ``ours``: the ParameterServer folds the replies one at a time as they arrive: each reply Message
  is built just before ``fold_reply`` and dropped after it; then one ``apply_update`` (FedAvg:
  server SGD, lr 1);
* ``flower``: ``flwr.serverapp.strategy.FedAvg().aggregate_train`` over the list of all reply
  Messages, which is how Flower's ``Strategy.start`` hands them over (``grid.send_and_receive``
  returns the whole round's replies at once).

Reported: peak RSS (``VmHWM``) minus the baseline RSS, and tracemalloc's peak (numpy and bytes
allocations), medians over ``--repeats`` fresh subprocesses (run with ``OPENBLAS_NUM_THREADS=1``:
memory does not depend on it, time does).

Throughput. One subprocess builds a pool of 8 reply Messages (and their numpy arrays) and times the
aggregation of ``--updates`` updates cycling over the pool, medians over ``--timings`` rounds that
time every method with numpy's default BLAS threads and with one (threadpoolctl) in turn:
ours (validate + fold into the float64 sum), ours fold-only (pre-validated), Flower's
``aggregate_train``, and a plain numpy weighted sum ``acc[k] += w * d[k]`` of the same arrays with
a float32 and a float64 accumulator.

    .venv/bin/python -m benchmarks.aggregation.memory           # 100 replies, 3 repeats (~3 min)
    .venv/bin/python -m benchmarks.aggregation.memory --quick   # 10 replies, 1 repeat
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from benchmarks.aggregation.worker import Spec
from benchmarks.common import RESULTS, ROOT, machine, median, table, write_json

WORKER = "benchmarks.aggregation.worker"  # runs each measurement, never imports torch
# Memory does not depend on BLAS threads; one keeps the memory runs short on a loaded machine.
ONE_BLAS_THREAD = {"OPENBLAS_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------- parent side
def resnet18_spec() -> Spec:
    from task.models import build_model

    model = build_model("resnet18", (3, 32, 32), 10)
    return [(k, list(v.shape), str(v.numpy().dtype)) for k, v in model.state_dict().items()]


def run_worker(
    mode: str, spec: Spec, env: dict[str, str] | None = None, **kwargs: Any
) -> dict[str, Any]:
    payload = json.dumps({"mode": mode, "spec": spec, **kwargs})
    out = subprocess.run(
        [sys.executable, "-m", WORKER],
        input=payload,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", **(env or {})},
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 replies, 1 repeat")
    parser.add_argument("--replies", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per side")
    parser.add_argument("--updates", type=int, default=32, help="updates per throughput timing")
    parser.add_argument("--timings", type=int, default=5, help="throughput timings (median)")
    args = parser.parse_args(argv)
    if args.quick:
        args.replies, args.repeats, args.updates, args.timings = 10, 1, 8, 3
    spec = resnet18_spec()
    params = sum(int(_prod(shape)) for _, shape, dtype in spec if dtype.startswith("float"))
    model_mb = sum(_prod(s) * _itemsize(d) for _, s, d in spec) / 2**20
    print(f"resnet18 (32x32x3, 10 classes): {params:,} float params, {model_mb:.1f} MiB per update")

    memory: dict[str, list[dict[str, Any]]] = {"ours": [], "flower": []}
    for repeat in range(args.repeats):
        for side in ("ours", "flower"):
            result = run_worker(
                "memory", spec, env=ONE_BLAS_THREAD, side=side, replies=args.replies, seed=repeat
            )
            memory[side].append(result)
            print(
                f"  memory {side:6s} repeat {repeat + 1}: peak RSS +{result['peak_rss_mb']:.0f} "
                f"MiB (receive {result['receive_phase']['peak_rss_mb']:.0f}, update "
                f"{result['update_phase']['peak_rss_mb']:.0f}), tracemalloc peak "
                f"{result['traced_peak_mb']:.0f} MiB, {result['seconds']:.1f} s",
                flush=True,
            )
    throughput = run_worker("throughput", spec, updates=args.updates, repeats=args.timings)
    text = report(args, memory, throughput, model_mb)
    print()
    print(text)
    write_json(
        RESULTS / ("aggregation_memory-quick.json" if args.quick else "aggregation_memory.json"),
        {
            "benchmark": "aggregation_memory",
            "model": "resnet18 (3x32x32, 10 classes)",
            "float_params": params,
            "update_mib": model_mb,
            "replies": args.replies,
            "memory": memory,
            "throughput": throughput,
            "machine": machine(),
            "table": text,
        },
    )


def report(
    args: argparse.Namespace,
    memory: dict[str, list[dict[str, Any]]],
    throughput: dict[str, dict[str, Any]],
    model_mb: float,
) -> str:
    def med(side: str, key: str, phase: str | None = None) -> float:
        return median([(r[phase] if phase else r)[key] for r in memory[side]])

    flower_rss = med("flower", "peak_rss_mb")
    labels = {
        "ours": "ours: ParameterServer.fold_reply, one reply at a time",
        "flower": "flower: FedAvg.aggregate_train(list of replies)",
    }
    mem_rows = [
        [
            labels[side],
            f"{med(side, 'peak_rss_mb'):.0f}",
            f"{med(side, 'peak_rss_mb', 'receive_phase'):.0f}",
            f"{med(side, 'peak_rss_mb', 'update_phase'):.0f}",
            f"{med(side, 'traced_peak_mb'):.0f}",
            f"{med(side, 'peak_rss_mb') / model_mb:.1f}",
            f"{med(side, 'peak_rss_mb') / flower_rss:.3f}x",
        ]
        for side in ("ours", "flower")
    ]
    ratio = med("ours", "peak_rss_mb") / flower_rss
    rows = throughput["rows"]
    numpy64 = next(r for r in rows if r["method"].startswith("numpy float64"))
    tp_rows = [
        [
            r["method"],
            f"{r['default_updates_per_s']:.1f}",
            f"{1e3 / r['default_updates_per_s']:.0f}",
            f"{r['default_updates_per_s'] / numpy64['default_updates_per_s']:.2f}x",
            f"{r['blas1_updates_per_s']:.1f}",
            f"{r['blas1_updates_per_s'] / numpy64['blas1_updates_per_s']:.2f}x",
        ]
        for r in rows
    ]
    return "\n".join(
        [
            f"Server memory aggregating {args.replies} resnet18 updates ({model_mb:.1f} MiB each),"
            f" MiB above the process baseline; median of {args.repeats} fresh processes per side",
            "",
            table(
                [
                    "aggregation",
                    "peak RSS",
                    "receive phase",
                    "update phase",
                    "tracemalloc peak",
                    "in updates",
                    "vs flower",
                ],
                mem_rows,
            ),
            "",
            f"Target (ours <= 0.2x Flower's peak): {'MET' if ratio <= 0.2 else 'NOT met'} "
            f"({ratio:.3f}x)",
            "",
            f"Aggregation throughput, {args.updates} resnet18 updates per timing, median of "
            f"{args.timings} interleaved timings; numpy's default BLAS threads, and 1 BLAS thread",
            "",
            table(
                [
                    "method",
                    "updates/s",
                    "ms/update",
                    "vs numpy float64",
                    "updates/s, 1 BLAS thread",
                    "vs numpy float64, 1 thread",
                ],
                tp_rows,
            ),
        ]
    )


def _prod(shape: list[int]) -> int:
    out = 1
    for n in shape:
        out *= int(n)
    return out


def _itemsize(dtype: str) -> int:
    import numpy as np

    return int(np.dtype(dtype).itemsize)


if __name__ == "__main__":
    main()
