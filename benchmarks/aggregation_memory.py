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

    .venv/bin/python benchmarks/aggregation_memory.py           # 100 replies, 3 repeats (~3 min)
    .venv/bin/python benchmarks/aggregation_memory.py --quick   # 10 replies, 1 repeat
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, machine, median, table, write_json  # noqa: E402

Spec = list[tuple[str, list[int], str]]  # (key, shape, dtype) in state_dict order
# Memory does not depend on BLAS threads; one keeps the memory runs short on a loaded machine.
ONE_BLAS_THREAD = {"OPENBLAS_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------- parent side
def resnet18_spec() -> Spec:
    sys.path.insert(0, str(ROOT))
    from task.models import build_model

    model = build_model("resnet18", (3, 32, 32), 10)
    return [(k, list(v.shape), str(v.numpy().dtype)) for k, v in model.state_dict().items()]


def run_worker(
    mode: str, spec: Spec, env: dict[str, str] | None = None, **kwargs: Any
) -> dict[str, Any]:
    payload = json.dumps({"mode": mode, "spec": spec, **kwargs})
    out = subprocess.run(
        [sys.executable, __file__, "--worker"],
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
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(sys.stdin.read()))))
        return
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


# ---------------------------------------------------------------------------- worker side
def worker(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from flwr.supercore.task_identity import TaskIdentity

    sys.path.insert(0, str(ROOT))
    # Flower 1.42 stamps run/node ids on every Message it builds; set them outside a runtime.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 11, 1
    spec: Spec = [(k, list(s), d) for k, s, d in job["spec"]]
    rng = np.random.default_rng(12345)
    reference = {
        k: (rng.standard_normal(s, dtype=np.float32) * 0.05).astype(d)
        if d.startswith("float")
        else np.zeros(s, dtype=d)
        for k, s, d in spec
    }
    if job["mode"] == "memory":
        return _memory(job, spec, reference)
    return _throughput(job, spec, reference)


def make_reply(i: int, spec: Spec, seed: int) -> Any:
    """One client's train reply (as the ClientApp sends it); arrays built key by key."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    rng = np.random.default_rng([seed, i])
    arrays = {}
    for key, shape, dtype in spec:
        if dtype.startswith("float"):
            value = rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
            value *= 1e-3
        else:
            value = np.ones(shape, dtype=dtype)
        arrays[key] = Array(value)
        del value
    metrics = MetricRecord(
        {"num-examples": 100 + i, "train-loss": 1.0, "version": 0, "partition-id": i}
    )
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics})
    return Message(content, 1, MessageType.TRAIN)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _memory(job: dict[str, Any], spec: Spec, reference: dict[str, Any]) -> dict[str, Any]:
    from flwr.serverapp.strategy import FedAvg

    from server.strategy import ParameterServer
    from task.config import StrategyConfig

    side, n, seed = job["side"], int(job["replies"]), int(job["seed"])
    if side == "ours":
        server = ParameterServer(StrategyConfig(name="fedavg"), seed=0)
        server.set_arrays(reference)
    else:
        strategy = FedAvg()
    make_reply(0, spec[:1], seed)  # import/first-use costs belong to the baseline
    gc.collect()
    baseline = _rss_mb()
    reset = _reset_peak()
    hwm_before = _hwm_mb()
    tracemalloc.start()
    started = time.perf_counter()
    # Phase 1 receives the replies (ours: folds each and drops it; Flower: holds them all),
    # phase 2 makes the new global arrays from them. Peaks are read per phase, then overall.
    if side == "ours":
        for i in range(n):
            reply = make_reply(i, spec, seed)  # arrives ...
            accepted = server.fold_reply(reply, start_version=0, staleness=0)  # ... is folded
            del reply  # ... and dropped
            assert accepted, "a generated reply was rejected"
    else:
        replies = [make_reply(i, spec, seed) for i in range(n)]  # the round's replies, all held
    phase1 = (_hwm_mb() - baseline, tracemalloc.get_traced_memory()[1] / 2**20)
    tracemalloc.reset_peak()
    _reset_peak()
    if side == "ours":
        server.apply_update()
        result_arrays = server.global_arrays
    else:
        record, _ = strategy.aggregate_train(1, replies)
        assert record is not None
        result_arrays = {k: v for k, v in record.items()}
        del replies
    phase2 = (_hwm_mb() - baseline, tracemalloc.get_traced_memory()[1] / 2**20)
    seconds = time.perf_counter() - started
    tracemalloc.stop()
    assert len(result_arrays) == len(spec)
    return {
        "side": side,
        "replies": n,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": max(phase1[0], phase2[0]),
        "traced_peak_mb": max(phase1[1], phase2[1]),
        "receive_phase": {"peak_rss_mb": phase1[0], "traced_peak_mb": phase1[1]},
        "update_phase": {"peak_rss_mb": phase2[0], "traced_peak_mb": phase2[1]},
        "peak_reset": reset,
        "hwm_at_baseline_mb": hwm_before,
        "seconds": seconds,
    }


def _throughput(job: dict[str, Any], spec: Spec, reference: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from flwr.serverapp.strategy import FedAvg

    from server.strategy import StreamingAggregator

    updates, repeats = int(job["updates"]), int(job["repeats"])
    pool = [make_reply(i, spec, 7) for i in range(8)]
    arrays = [{k: v.numpy() for k, v in m.content["arrays"].items()} for m in pool]
    weights = [float(m.content["metrics"]["num-examples"]) for m in pool]
    float_keys = [k for k, _, d in spec if d.startswith("float")]

    def ours() -> None:
        agg = StreamingAggregator(reference)
        for u in range(updates):
            assert agg.add(pool[u % len(pool)].content, node_id=1)
        agg.mean_delta()

    validated = [StreamingAggregator(reference).validate(m.content, 1) for m in pool]

    def ours_fold_only() -> None:
        agg = StreamingAggregator(reference)
        for u in range(updates):
            agg.fold(validated[u % len(pool)])  # type: ignore[arg-type]
        agg.mean_delta()

    def flower() -> None:
        FedAvg().aggregate_train(1, [pool[u % len(pool)] for u in range(updates)])

    def plain(dtype: Any) -> Any:
        def run() -> None:
            acc = {k: np.zeros(reference[k].shape, dtype=dtype) for k in float_keys}
            total = 0.0
            for u in range(updates):
                d, w = arrays[u % len(pool)], weights[u % len(pool)]
                for k in float_keys:
                    acc[k] += w * d[k]
                total += w
            for k in float_keys:
                acc[k] /= total

        return run

    methods = [
        ("ours: validate + fold (float64 sum)", ours),
        ("ours: fold only (pre-validated)", ours_fold_only),
        ("flower: FedAvg.aggregate_train", flower),
        ("numpy float32: acc += w * d", plain(np.float32)),
        ("numpy float64: acc += w * d", plain(np.float64)),
    ]
    # Interleaved (every timing round times every method under both BLAS settings), so a change
    # in the machine's load hits all of them alike; medians over the rounds.
    from threadpoolctl import threadpool_limits

    settings = {"default": None, "blas1": 1}
    times: dict[tuple[str, str], list[float]] = {}
    for _, fn in methods:
        fn()  # warm-up
    for _ in range(repeats):
        for setting, limit in settings.items():
            with threadpool_limits(limits=limit, user_api="blas"):
                for name, fn in methods:
                    started = time.perf_counter()
                    fn()
                    times.setdefault((name, setting), []).append(time.perf_counter() - started)
    rows = [
        {
            "method": name,
            **{f"{setting}_seconds": sorted(times[(name, setting)]) for setting in settings},
            **{
                f"{setting}_updates_per_s": updates / median(times[(name, setting)])
                for setting in settings
            },
        }
        for name, _ in methods
    ]
    return {"updates": updates, "repeats": repeats, "rows": rows}


if __name__ == "__main__":
    main()
