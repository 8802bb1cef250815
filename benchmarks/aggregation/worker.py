"""The measuring side of :mod:`benchmarks.aggregation.memory`: one job per fresh subprocess,
never torch.

Reads a JSON job on stdin (``mode`` memory or throughput, the model ``spec`` and the mode's
knobs), prints one JSON result line. Started as ``python -m benchmarks.aggregation.worker`` from
the repository root by ``memory.run_worker``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import tracemalloc
from typing import Any

from benchmarks.common import median

Spec = list[tuple[str, list[int], str]]  # (key, shape, dtype) in state_dict order


def worker(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from flwr.supercore.task_identity import TaskIdentity

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

    from server.strategy import ServerState
    from server.strategy.config import StrategyConfig

    side, n, seed = job["side"], int(job["replies"]), int(job["seed"])
    if side == "ours":
        server = ServerState(StrategyConfig(name="fedavg"), seed=0)  # the ParameterServer's state
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
            accepted = server.fold(reply, start_version=0, staleness=0)  # ... is folded
            del reply  # ... and dropped
            assert accepted, "a generated reply was rejected"
    else:
        replies = [make_reply(i, spec, seed) for i in range(n)]  # the round's replies, all held
    phase1 = (_hwm_mb() - baseline, tracemalloc.get_traced_memory()[1] / 2**20)
    tracemalloc.reset_peak()
    _reset_peak()
    if side == "ours":
        server.apply()
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
            agg.offer(validated[u % len(pool)], node_id=1)  # type: ignore[arg-type]
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
    print(json.dumps(worker(json.loads(sys.stdin.read()))))
