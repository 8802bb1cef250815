"""Many model versions under one budget: static-equal vs LRU-only vs ours (issue 15).

    .venv/bin/python -m benchmarks.scheduler.bench [--quick] [--rate R] [--phase-s S] [--rows N]

The repository (:mod:`benchmarks.scheduler.repository`): 16 versions from real training runs,
built once and cached. Each version is first loaded alone, the way the server loads it
(:func:`measure_alone`, medians of 3), which gives its memory and its cold-start reference (its
build: session load + warm-up). The memory budget is a third of the versions' total; the engine
budget (``--engines``) is the same for all three contenders, each a ``fedserve-serve``
subprocess:

* **static-equal** (Triton's way): the versions that fit the memory budget, smallest first and at
  most one per engine, are loaded at start with ``engines / n`` engines each
  (``serving.instances``); the others are not in its repository, so their requests fail (404);
* **LRU-only** (ModelMesh's / Ray multiplexing's way): ``serving.load=on_demand``, least recently
  used eviction, one engine per loaded version (``serving.instances=1``);
* **ours**: on demand, LRU eviction, engines follow demand (``serving.instances`` unset).

The load (:mod:`benchmarks.scheduler.workload`, :mod:`benchmarks.scheduler.client`): Poisson
arrivals at ``--rate`` requests/s of ``--rows``-row requests (default 1), Zipf(s=1.1) over the
versions with a new random ranking every ``--phase-s`` seconds, the same requests for every
contender. Open loop: every contender is offered the same requests at the same times, so
"throughput" is successful responses per second at that offered rate, and static-equal's is bounded
by the share of the requests that address the versions it holds. The rate is meant to be one
static-equal serves without queueing (its p99 stays near a run's time), so its failures are the 404s
of what it does not hold, not overload.

Reported per contender, medians over ``--repeats`` runs (contenders interleaved, order rotated):
offered and successful requests/s, failed requests, p50/p99 latency overall and per popularity
class, cold starts (the scheduler's "cold start" log lines: first request to a non-resident
version until it serves) p50/p99 and their ratio to that version's build alone, the same ratio
for the builds themselves during the run (how much the shared CPU slows a load), the
scheduler's peak memory (sum of the loaded versions' measured sizes) against the budget and the
server's peak RSS, loads and evictions. Also printed: the share of requests an ideal LRU cache of
the budget would miss (:func:`ideal_lru_miss_share`) and the share a cache that knows the future
would (:func:`furthest_use_miss_share`), which no on-demand contender comes much below: when it
is above 1 %, a p99 without load waits is out of reach. Results:
``benchmarks/results/<--name, default scheduler>[-quick].json`` and ``.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.common import RESULTS, ROOT, machine, median, table, write_json
from benchmarks.scheduler.client import Record, run
from benchmarks.scheduler.repository import CACHE, default_mnist, ensure_repository
from benchmarks.scheduler.workload import CLASSES, Arrival, Target, schedule
from server.processes import free_port, stop_process_group
from serving.repository import ModelRepository
from serving.settings import ServingConfig
from serving.signature import ModelSignature
from serving.v2_client import V2Client, encode_request
from serving.version_loader import load_version, release

CONTENDERS = ("static-equal", "LRU-only", "ours")
COLD_START = re.compile(r"serving (\S+) version (\d+) \(.*cold start ([\d.]+) s\)")
SWAP_TIMING = re.compile(r"swap timing (\{.*\})")


def discover(repo: ModelRepository, rows: int = 1) -> list[Target]:
    """Every version of the repository as a load target (a random input of ``rows`` rows)."""
    rng = np.random.default_rng(0)
    targets = []
    for name in repo.list_models():
        for version in repo.list_versions(name):
            meta = repo.load_metadata(name, version)
            sig = ModelSignature.build(meta["inputs"], meta["outputs"], meta["max_batch_size"])
            spec = sig.inputs[0]
            shape = [rows, *[d if d > 0 else 1 for d in spec.shape[1:]]]
            body, header = encode_request({spec.name: rng.standard_normal(shape, np.float32)})
            assert header is not None
            path = f"/v2/models/{name}/versions/{version}/infer"
            targets.append(Target(name, version, path, body, header))
    return targets


def measure_alone(repo: ModelRepository, targets: list[Target]) -> dict[str, dict[str, float]]:
    """Per version, loaded alone the way the server loads it (``load_version``: one engine on the
    CPU, nothing else running): a first load (verified), then 3 reloads, as a server reloads a
    version after an eviction (its files verified before; the first reload saves the optimized
    graph, the others create their session from it, :mod:`serving.graph_cache`). Medians of the
    reloads: ``build_s``, the session's load plus its warm-up (the cold-start reference), and
    ``memory_bytes`` as measured at load; ``verify_s`` and ``first_build_s`` are the first
    load's, which only a version's first load in a server pays."""
    settings = ServingConfig(providers="cpu")
    out = {}
    for t in targets:
        build, verify, memory = [], [], []
        for attempt in range(4):
            loaded = load_version(
                repo, t.name, t.version, settings, engines=1, verified=attempt > 0
            )
            timing = loaded.timing
            build.append(float(timing["load_s"] or 0.0) + float(timing["warm_s"] or 0.0))
            verify.append(float(timing["verify_s"] or 0.0))
            memory.append(loaded.pool.memory_bytes())
            loaded.pool.close()
            release(repo, t.name, t.version, loaded.lease)
        out[t.key] = {
            "build_s": median(build[1:]),
            "first_build_s": build[0],
            "verify_s": verify[0],
            "memory_bytes": median(memory[1:]),
        }
    return out


def ideal_lru_miss_share(
    targets: list[Target],
    arrivals: list[Arrival],
    alone: dict[str, dict[str, float]],
    budget: int,
    slots: int,
) -> float:
    """The share of requests that find their version not resident under an ideal LRU cache of
    ``budget`` bytes and ``slots`` versions (sizes as measured alone, loads instantaneous): what
    LRU eviction itself costs on the trace, before any load takes time."""
    return _miss_share(targets, arrivals, alone, budget, slots, rank=lambda i: i)


def furthest_use_miss_share(
    targets: list[Target],
    arrivals: list[Arrival],
    alone: dict[str, dict[str, float]],
    budget: int,
    slots: int,
) -> float:
    """The share of requests that miss under a cache that knows the future (Belady's rule:
    evict the resident version whose next request is furthest away, until the new one fits;
    sizes as measured alone, loads instantaneous). LRU is no floor (a policy that sees sizes or
    frequencies beats it); this near-optimal offline policy is the one no on-demand contender
    comes below by much."""
    next_use = [0] * len(arrivals)
    seen: dict[int, int] = {}
    for i in range(len(arrivals) - 1, -1, -1):
        next_use[i] = seen.get(arrivals[i].target, len(arrivals))
        seen[arrivals[i].target] = i
    return _miss_share(targets, arrivals, alone, budget, slots, rank=lambda i: -next_use[i])


def _miss_share(
    targets: list[Target],
    arrivals: list[Arrival],
    alone: dict[str, dict[str, float]],
    budget: int,
    slots: int,
    rank: Callable[[int], float],
) -> float:
    """A cache of ``budget`` bytes and ``slots`` versions that evicts, until a missing version
    fits, the resident one with the lowest ``rank`` of the request that last used it."""
    resident: dict[int, float] = {}
    used, misses = 0, 0
    for i, a in enumerate(arrivals):
        if a.target not in resident:
            misses += 1
            size = int(alone[targets[a.target].key]["memory_bytes"])
            while resident and (used + size > budget or len(resident) >= slots):
                victim = min(resident, key=resident.__getitem__)
                resident.pop(victim)
                used -= int(alone[targets[victim].key]["memory_bytes"])
            used += size
        resident[a.target] = rank(i)
    return misses / max(1, len(arrivals))


def static_choice(
    targets: list[Target], alone: dict[str, dict[str, float]], budget: int, engines: int
) -> list[Target]:
    """The versions static-equal loads: smallest first while they fit, one engine each at most."""
    chosen, used = [], 0
    for t in sorted(targets, key=lambda t: (alone[t.key]["memory_bytes"], t.key)):
        size = int(alone[t.key]["memory_bytes"])
        if used + size > budget or len(chosen) >= engines:
            continue
        chosen.append(t)
        used += size
    return chosen


def static_repository(source: Path, chosen: list[Target], dest: Path) -> Path:
    """A repository holding only ``chosen`` (version directories hard-linked when possible)."""
    shutil.rmtree(dest, ignore_errors=True)
    for t in chosen:
        mdir = dest / t.name
        if not mdir.exists():
            mdir.mkdir(parents=True)
            shutil.copy2(source / t.name / "config.pbtxt", mdir / "config.pbtxt")
        shutil.copytree(
            source / t.name / str(t.version), mdir / str(t.version), copy_function=_link
        )
    return dest


def _link(src: str, dst: str) -> None:
    try:
        Path(dst).hardlink_to(src)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def server(overrides: list[str], log_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """``fedserve-serve`` with ``overrides`` on a free port, its output in ``log_path``."""
    port = free_port()
    cmd = [sys.executable, "-m", "serving.cli", f"port={port}", "log_level=warning", *overrides]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            with V2Client(base, timeout=5.0) as client:
                client.wait_until_ready(300, process=proc)
            yield base, proc
        finally:
            stop_process_group(proc, grace=30.0, first=signal.SIGINT)


class RssPeak:
    """Samples a process's resident memory every 0.2 s; ``peak`` is the largest sample."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


def scrape(base: str) -> dict[str, float]:
    """Sums over models of the scheduler's counters and its peak memory, from /metrics."""
    import httpx

    text = httpx.get(f"{base}/metrics", timeout=30).text
    sums = {"loads": 0.0, "evictions": 0.0, "peak": 0.0, "budget": 0.0}
    keys = {
        "fedserve_scheduler_loads_total": "loads",
        "fedserve_scheduler_evictions_total": "evictions",
        "fedserve_scheduler_memory_peak_bytes": "peak",
        "fedserve_scheduler_budget_memory_bytes": "budget",
    }
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in keys:
            sums[keys[name]] += float(line.rsplit(" ", 1)[1])
    return sums


def summarise(
    records: list[Record],
    seconds: float,
    cold: list[tuple[str, float]],
    loads: list[tuple[str, float]],
    alone: dict[str, dict[str, float]],
    server_stats: dict[str, float],
    rss_peak: int,
) -> dict[str, Any]:
    """One run's figures over ``seconds`` of schedule (or until the last answer, if later);
    ``cold`` are the cold starts (first request to a non-resident version until it serves) and
    ``loads`` every load's build in the run (session + warm-up, from the server's log), each
    with its version."""
    nominal_s = seconds
    ok = [r for r in records if r.status == 200]
    # a server that falls behind answers after the schedule ends: count until its last answer
    seconds = max(seconds, max((r.due_s + r.latency_s for r in records), default=0.0))
    in_run = [s / alone[k]["build_s"] for k, s in loads]
    cold_ratio = [s / alone[k]["build_s"] for k, s in cold]
    out: dict[str, Any] = {
        "offered_rps": len(records) / nominal_s,
        "seconds": seconds,
        "throughput_rps": len(ok) / seconds,
        "failed": len(records) - len(ok),
        "failed_by_status": _counts(r.status for r in records if r.status != 200),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "p50_ms": _pct([r.latency_s for r in ok], 50),
        "p99_ms": _pct([r.latency_s for r in ok], 99),
        "loads": server_stats["loads"],
        "evictions": server_stats["evictions"],
        "peak_memory_bytes": server_stats["peak"],
        "rss_peak_bytes": rss_peak,
        "cold_starts": len(cold),
        "cold_start_p50_ms": _pct([s for _, s in cold], 50),
        "cold_start_p99_ms": _pct([s for _, s in cold], 99),
        "cold_start_ratio_p50": _quantile(cold_ratio, 50),
        "cold_start_ratio_p99": _quantile(cold_ratio, 99),
        # the floor of that ratio: a build's own duration in the run over the same build alone
        "build_ratio_p50": _quantile(in_run, 50),
        "build_ratio_p99": _quantile(in_run, 99),
        # builds run one at a time: the share of the run the loader was building something, and
        # so how often a cold start finds another build ahead of its own
        "loader_busy_share": sum(s for _, s in loads) / seconds,
        "slow_requests_share": sum(1 for r in ok if r.latency_s > 0.1) / max(1, len(ok)),
    }
    for name, _, _ in CLASSES:
        lat = [r.latency_s for r in ok if r.popularity == name]
        out[f"class_{name}_p50_ms"] = _pct(lat, 50)
        out[f"class_{name}_p99_ms"] = _pct(lat, 99)
        out[f"class_{name}_ok"] = len(lat)
    return out


def _quantile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1000) if values else float("nan")


def _counts(statuses: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in statuses:
        counts[str(s)] = counts.get(str(s), 0) + 1
    return counts


def run_contender(
    contender: str,
    args: argparse.Namespace,
    repo_dir: Path,
    targets: list[Target],
    arrivals: list[Any],
    alone: dict[str, dict[str, float]],
    budget: int,
    static: list[Target],
    log_path: Path,
) -> dict[str, Any]:
    common = [
        "serving.providers=cpu",
        "serving.grpc_port=null",
        "serving.versions=100",
        f"serving.budget.memory_bytes={budget}",
        f"serving.budget.engines={args.engines}",
    ]
    if contender == "static-equal":
        source = static_repository(repo_dir, static, CACHE / "static_repository")
        per = max(1, args.engines // max(1, len(static)))
        overrides = [
            f"repository={source}",
            *common,
            "serving.load=eager",
            f"serving.instances={per}",
        ]
    elif contender == "LRU-only":
        overrides = [
            f"repository={repo_dir}",
            *common,
            "serving.load=on_demand",
            "serving.instances=1",
        ]
    else:
        overrides = [f"repository={repo_dir}", *common, "serving.load=on_demand"]
    with server(overrides, log_path) as (base, proc):
        rss = RssPeak(proc.pid)
        records = run(base, targets, arrivals, connections=args.connections)
        rss_peak = rss.stop()
        stats = scrape(base)
    cold, loads, waits = parse_log(log_path.read_text(errors="replace"))
    out = summarise(records, args.phases * args.phase_s, cold, loads, alone, stats, rss_peak)
    out["cold_wait_p50_ms"] = _pct(waits, 50)
    out["cold_wait_p99_ms"] = _pct(waits, 99)
    return out


def parse_log(text: str) -> tuple[list[tuple[str, float]], list[tuple[str, float]], list[float]]:
    """From a server's log: its cold starts and its loads' builds, each (version, seconds), and
    each cold start's wait before its own load began (the cold start less the load's own
    verify-build-publish time: queued behind other loads, making room, taking an engine; a
    version's "serving ... cold start" line comes before its "swap timing" line)."""
    cold, loads, waits = [], [], []
    pending: dict[str, float] = {}
    for line in text.splitlines():
        if m := COLD_START.search(line):
            key = f"{m.group(1)}:{m.group(2)}"
            cold.append((key, float(m.group(3))))
            pending[key] = float(m.group(3))
        elif m := SWAP_TIMING.search(line):
            t = json.loads(m.group(1))
            key = f"{t['model']}:{t['version']}"
            loads.append((key, t["load_s"] + t["warm_s"]))
            if key in pending:
                own = t["serving_at"] - t["detected_at"]
                waits.append(max(0.0, pending.pop(key) - own))
    return cold, loads, waits


def report(results: dict[str, list[dict[str, Any]]], budget: int) -> str:
    def med(contender: str, key: str) -> float:
        return median([r[key] for r in results[contender]])

    def pair(c: str, key: str, scale: str, unit: str = "") -> str:
        return f"{med(c, f'{key}_p50{unit}'):{scale}} / {med(c, f'{key}_p99{unit}'):{scale}}"

    rows: list[list[Any]] = []
    for label, cell in (
        ("offered (req/s)", lambda c: med(c, "offered_rps")),
        ("throughput (ok req/s)", lambda c: med(c, "throughput_rps")),
        ("failed requests", lambda c: med(c, "failed")),
        ("p50 / p99 ms", lambda c: f"{med(c, 'p50_ms'):.1f} / {med(c, 'p99_ms'):.0f}"),
        *[
            (
                f"{n} (ranks {lo}-{hi}) p50 / p99 ms"
                if hi < 100
                else f"{n} (ranks {lo}+) p50 / p99 ms",
                lambda c, n=n: pair(c, f"class_{n}", ".1f", "_ms"),
            )
            for n, lo, hi in CLASSES
        ],
        ("requests over 100 ms (share)", lambda c: f"{med(c, 'slow_requests_share'):.3f}"),
        ("cold starts", lambda c: med(c, "cold_starts")),
        (
            "cold start p50 / p99 ms",
            lambda c: f"{med(c, 'cold_start_p50_ms'):.0f} / {med(c, 'cold_start_p99_ms'):.0f}",
        ),
        ("cold start / build alone, p50 / p99", lambda c: pair(c, "cold_start_ratio", ".1f")),
        ("wait before its own load, p50 / p99 ms", lambda c: pair(c, "cold_wait", ".0f", "_ms")),
        ("a build in the run / alone, p50 / p99", lambda c: pair(c, "build_ratio", ".1f")),
        ("building a version (share of the run)", lambda c: f"{med(c, 'loader_busy_share'):.2f}"),
        (
            f"peak memory MB (budget {budget / 1e6:.1f})",
            lambda c: f"{med(c, 'peak_memory_bytes') / 1e6:.1f}",
        ),
        ("server peak RSS MB", lambda c: f"{med(c, 'rss_peak_bytes') / 1e6:.0f}"),
        ("loads / evictions", lambda c: f"{med(c, 'loads'):.0f} / {med(c, 'evictions'):.0f}"),
    ):
        rows.append([label, *[cell(c) for c in CONTENDERS]])
    ratio = med("ours", "throughput_rps") / med("static-equal", "throughput_rps")
    rows.append(["ours / static-equal throughput", "", "", f"{ratio:.2f}x"])
    return table(["median of runs", *CONTENDERS], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 run, 2 phases of 10 s")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rate", type=float, default=150.0, help="requests/s (Poisson)")
    parser.add_argument("--phases", type=int, default=4, help="hot-set phases per run")
    parser.add_argument("--phase-s", type=float, default=30.0, help="seconds per phase")
    parser.add_argument("--engines", type=int, default=8, help="serving.budget.engines")
    parser.add_argument("--rows", type=int, default=1, help="rows per request (batch size)")
    parser.add_argument("--memory-share", type=float, default=1 / 3, help="budget / total")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--zipf-s", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mnist", type=Path, default=default_mnist())
    parser.add_argument("--rebuild", action="store_true", help="train the repository again")
    parser.add_argument("--name", default="scheduler", help="results/<name>[-quick].json")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.phases, args.phase_s = 1, 2, 10.0
    suffix = "-quick" if args.quick else ""
    repo_dir = ensure_repository(args.mnist, args.rebuild)
    repo = ModelRepository(repo_dir)
    targets = discover(repo, args.rows)
    alone = measure_alone(repo, targets)
    total = sum(v["memory_bytes"] for v in alone.values())
    budget = int(total * args.memory_share)
    static = static_choice(targets, alone, budget, args.engines)
    print(
        f"{len(targets)} versions, {total / 1e6:.1f} MB measured in all; memory budget "
        f"{budget / 1e6:.1f} MB, {args.engines} engines; static-equal holds "
        f"{[t.key for t in static]}",
        flush=True,
    )
    arrivals = schedule(len(targets), args.rate, args.phases, args.phase_s, args.zipf_s, args.seed)
    miss_share = ideal_lru_miss_share(targets, arrivals, alone, budget, args.engines)
    floor_share = furthest_use_miss_share(targets, arrivals, alone, budget, args.engines)
    print(
        f"an ideal LRU cache of the budget misses {miss_share:.3%} of the requests; one that "
        f"knows the future (furthest next use) {floor_share:.3%}",
        flush=True,
    )
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in CONTENDERS}
    logs = CACHE / "logs"
    for rep in range(args.repeats):
        order = CONTENDERS[rep % 3 :] + CONTENDERS[: rep % 3]
        for contender in order:
            log_path = logs / f"{contender}-{rep}{suffix}.log"
            res = run_contender(
                contender, args, repo_dir, targets, arrivals, alone, budget, static, log_path
            )
            results[contender].append(res)
            print(f"run {rep} {contender}: {json.dumps(res)}", flush=True)
    text = report(results, budget)
    print(text, flush=True)
    write_json(
        RESULTS / f"{args.name}{suffix}.json",
        {
            "command": "python -m benchmarks.scheduler.bench " + " ".join(sys.argv[1:]),
            "args": {k: str(v) for k, v in vars(args).items()},
            "machine": machine(),
            "versions": {t.key: alone[t.key] for t in targets},
            "memory_budget_bytes": budget,
            "ideal_lru_miss_share": miss_share,
            "furthest_use_miss_share": floor_share,
            "static_equal_holds": [t.key for t in static],
            "runs": results,
            "table": text,
        },
    )


if __name__ == "__main__":
    main()
