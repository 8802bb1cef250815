"""Time to a test accuracy with a quarter of the clients 5x slower: FedBuff (async) vs sync FedAdam.

The MNIST setup of ``strategies.py`` (``jobs.IDX_SETUP``) plus ``heterogeneity.slow_fraction=0.25
slow_factor=5``: a seeded quarter of the 20 clients takes 5x its work (CPU seconds of training),
sleeping the difference (``client/heterogeneity.py``). Both jobs stop at ``--target`` test
accuracy (``stop_at_accuracy``).

* sync ``fedadam``: all 20 clients per round, each round waits for the slowest; client and server
  lr from ``results/strategies.json`` (FedAdam's best cell) when it exists, else 0.1 / 0.01.
* async ``fedbuff``: ``concurrency`` clients kept busy, a new version every ``buffer_size`` replies
  (staleness-weighted 1/sqrt(1+tau), dropped beyond ``max_staleness``), server SGD lr 1 (FedBuff's
  defaults, ``conf/strategy/fedbuff.yaml``); client lr from FedAvg's best cell (Flower's or ours)
  in ``results/strategies.json``, else 0.1.

Reported per job: versions and client updates to the target, the history's training seconds up
to the first version at the target (``seconds`` summed, from a ready federation: the partition
query that precedes version 1 carries the task, so every client has loaded its data and warmed
torch up before the clock starts), and the job's wall clock (start-up of SuperLink, Ray and 20
nodes included).

Simulation slots. ``fedserve-train`` runs each simulated client in a Ray actor; Ray sizes the pool
by its CPU count (the machine's cores unless ``--slots N`` sets ``RAY_OVERRIDE_RESOURCES``), and
our ``flwr-simulation`` wrapper (``server/simulation_runtime.py``) lets every actor run at once
(flwr's own engine runs at most cpu_count + 4 = 6 here). A slow client's sleep holds its actor, so
with fewer slots than clients the sleep also blocks other clients' work — unlike a real
federation, where every client has its own device.

Devices. With ``--device-factor 1`` every simulated client computes at this machine's speed, and
the 20 clients share its 2 cores: training is CPU-bound however it is scheduled, so waiting for a
straggler costs a sync round little. ``--device-factor F`` (``heterogeneity.device_factor``) makes
every client's device F times slower than a core here (the slow quarter 5F): clients mostly sleep,
the CPU stops being the bottleneck, and the time is the devices' — the setting of a real
federation, in which sync waits for its slowest device every round. Use ``--slots 20`` with it
(every client an actor of its own, as every client has a device of its own).

Versions are announced in background on both sides (``--publish background``, the default:
``strategy.publish_in_background=true``): the central evaluation (~0.4-0.6 s of 2,000 test images
here), history and checkpoint of a version run on a worker thread while the clients already train
on it, and ``seconds`` are the strategy's own time between versions. At devices 10x slower this
changed FedBuff's version rate little (1.8 s a version either way): the clients in flight keep
training while the server evaluates, only the few replies that arrive meanwhile wait. It matters
when a version's announcement is long (an ONNX export per version, a big test set).

What a version publishes: ``--ema-decay 0.8`` (the default, ``fedbuff.yaml``'s) evaluates the
average of FedBuff's versions (``strategy.ema_decay``), ``0`` the last version itself;
``--sync-ema-decay`` does the same for sync FedAdam (default 0).

Which client gets a free slot: ``--selection balanced`` (the default, ``fedbuff.yaml``'s) the idle
one sent the fewest models; ``uniform`` (FedBuff's paper) one drawn uniformly, which gives a fast
client ~5x the updates of a 5x slower one.

FedBuff's settings (``--concurrency``, ``--buffer-size``, ``--max-staleness``, ``--selection``,
``--server-optimizer``, ``--server-lr``, ``--server-momentum``, ``--client-lr``, ``--ema-decay``)
name the results file when they differ from the defaults (``--ema-decay`` whenever it is not
0); ``--only async`` then reuses the sync side of the same slots and device factor, so a search
over them runs sync once.

``--repeats N`` (default 3) runs N sync/async pairs in turn; the table has a row per run and the
medians, and the verdict is on the median of the per-pair ratios (the machine is shared and noisy,
and the arrival order differs from run to run).

    nice -n 10 .venv/bin/python -m benchmarks.training.async_vs_sync --slots 20 \
        --device-factor 10                                       # ~20 min
    nice -n 10 .venv/bin/python -m benchmarks.training.async_vs_sync --slots 20 \
        --device-factor 10 --selection uniform --only async     # uniform picking vs the same syncs
    .venv/bin/python -m benchmarks.training.async_vs_sync --quick  # 2 versions each (smoke)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, machine, median, write_json
from benchmarks.training.async_vs_sync_report import report
from benchmarks.training.jobs import IDX_SETUP, RUNS, JobResult, exit_on_sigterm, run_job

HETEROGENEITY = ["heterogeneity.slow_fraction=0.25", "heterogeneity.slow_factor=5"]


def best_cells() -> dict[str, dict[str, Any]]:
    """Each strategy's best cell of ``strategies.json``: fewest rounds to its target, else (none
    reached it) the highest test accuracy."""
    path = RESULTS / "strategies.json"
    if not path.exists():
        return {}

    def rank(cell: dict[str, Any]) -> tuple[float, float]:
        rounds = cell.get("rounds_to_target")
        return (math.inf if rounds is None else rounds, -max(cell["job"]["test_acc"], default=0))

    best: dict[str, dict[str, Any]] = {}
    for cell in json.loads(path.read_text()).get("cells", []):
        if cell.get("skipped") or not cell["job"]["test_acc"]:
            continue
        if cell["strategy"] not in best or rank(cell) < rank(best[cell["strategy"]]):
            best[cell["strategy"]] = cell
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 versions per job (smoke run)")
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--rounds", type=int, default=40, help="sync rounds cap (default 40)")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--buffer-size", type=int, default=5)
    parser.add_argument("--max-staleness", type=int, default=10)
    parser.add_argument(
        "--selection",
        choices=("uniform", "balanced"),
        default="balanced",
        help="which idle client FedBuff sends a free slot to (strategy.selection; default "
        "balanced, conf/strategy/fedbuff.yaml's)",
    )
    parser.add_argument("--slots", type=int, default=0, help="Ray CPU slots (0: Ray's default)")
    parser.add_argument(
        "--device-factor",
        type=float,
        default=1.0,
        help="heterogeneity.device_factor: every client's device this many times slower",
    )
    parser.add_argument(
        "--server-optimizer",
        default="sgd",
        choices=("sgd", "adam", "yogi", "adagrad"),
        help="FedBuff's server optimizer (default sgd, FedBuff's own)",
    )
    parser.add_argument("--server-lr", type=float, default=1.0, help="FedBuff's server lr")
    parser.add_argument(
        "--server-momentum", type=float, default=0.0, help="FedBuff's server SGD momentum"
    )
    parser.add_argument(
        "--client-lr", type=float, help="FedBuff's client lr (default: FedAvg's best cell's)"
    )
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=0.8,
        help="FedBuff's strategy.ema_decay: publish an average of its versions (default 0.8, "
        "fedbuff.yaml's; 0: off, the runs before it, whose files have no -ema)",
    )
    parser.add_argument(
        "--sync-ema-decay",
        type=float,
        default=0.0,
        help="sync FedAdam's strategy.ema_decay (default 0: off); names the results file",
    )
    parser.add_argument(
        "--publish",
        choices=("background", "inline"),
        default="background",
        help="both sides: announce each version (central evaluation, checkpoint) on a worker "
        "thread while the clients train on (strategy.publish_in_background), or inline, the "
        "loop waiting for it (the runs before this option; their files have no -bg)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--repeats", type=int, default=3, help="sync/async pairs, run in turn (default 3)"
    )
    parser.add_argument(
        "--only",
        choices=("sync", "async"),
        help="run one side only; the other side comes from this setting's results file, else "
        "from the file of the same slots and device factor with FedBuff's defaults",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.quick:
        args.repeats = 1
    exit_on_sigterm()

    best = best_cells()
    adam = best.get("fedadam")
    # FedBuff's server is FedAvg's (SGD, lr 1): take FedAvg's best client lr, Flower's or ours.
    fedavgs = [best[k] for k in ("flower_fedavg", "fedavg") if k in best]
    avg = min(fedavgs, key=lambda c: c.get("rounds_to_target") or math.inf, default=None)
    adam_clr, adam_slr = (adam["client_lr"], adam["server_lr"]) if adam else (0.1, 0.01)
    buff_clr = args.client_lr or (avg["client_lr"] if avg else 0.1)
    buff_server = f"server {args.server_optimizer} lr {args.server_lr:g}" + (
        f" momentum {args.server_momentum:g}" if args.server_momentum else ""
    )
    # The same number of client updates for both caps: a sync round is num_clients updates.
    versions_cap = args.rounds * 20 // args.buffer_size
    background = args.publish == "background"
    publish = [f"strategy.publish_in_background={str(background).lower()}"]
    announced = ", versions announced in background" if background else ""
    jobs = {
        "sync": (
            "fedadam (sync)",
            [
                "strategy=fedadam",
                f"train.lr={adam_clr:g}",
                f"strategy.server_lr={adam_slr:g}",
                f"strategy.ema_decay={args.sync_ema_decay:g}",
                f"rounds={2 if args.quick else args.rounds}",
                *publish,
            ],
            f"client lr {adam_clr:g}, server lr {adam_slr:g}, 20 clients/round"
            + averaged(args.sync_ema_decay)
            + announced,
        ),
        "async": (
            "fedbuff (async)",
            [
                "strategy=fedbuff",
                f"train.lr={buff_clr:g}",
                f"strategy.concurrency={args.concurrency}",
                f"strategy.buffer_size={args.buffer_size}",
                f"strategy.max_staleness={args.max_staleness}",
                f"strategy.selection={args.selection}",
                f"strategy.optimizer={args.server_optimizer}",
                f"strategy.server_lr={args.server_lr:g}",
                f"strategy.momentum={args.server_momentum:g}",
                f"strategy.ema_decay={args.ema_decay:g}",
                f"rounds={2 if args.quick else versions_cap}",
                *publish,
            ],
            f"client lr {buff_clr:g}, {buff_server}, concurrency {args.concurrency}, "
            f"buffer {args.buffer_size}, max staleness {args.max_staleness}, "
            f"{args.selection} selection" + averaged(args.ema_decay) + announced,
        ),
    }
    env = {"RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": args.slots})} if args.slots else None
    base = (
        ("-quick" if args.quick else "")
        + (f"-slots{args.slots}" if args.slots else "")
        + (f"-device{args.device_factor:g}" if args.device_factor != 1 else "")
        + ("-bg" if background else "")
    )
    sync_ema = f"-syncema{args.sync_ema_decay:g}" if args.sync_ema_decay else ""
    suffix = base + sync_ema + async_suffix(args)
    heterogeneity = [*HETEROGENEITY, f"heterogeneity.device_factor={args.device_factor:g}"]
    out = RESULTS / f"async_vs_sync{suffix}.json"
    results: dict[str, Any] = {
        "benchmark": "async_vs_sync",
        "target": args.target,
        "setup": [*IDX_SETUP, *heterogeneity],
        "ray_cpu_slots": args.slots or "default (machine cores)",
        "device_factor": args.device_factor,
        "machine": machine(),
        "repeats": args.repeats,
        "runs": [],
    }
    # the other side: this setting's file, else the default one of the side that is not rerun
    other = base + (async_suffix(args) if args.only == "sync" else sync_ema)
    candidates = tuple(RESULTS / f"async_vs_sync{name}.json" for name in (suffix, other, base))
    reused = _reused_side(args.only, candidates, results)
    started = time.perf_counter()
    for index in range(args.repeats):
        run: dict[str, Any] = {}
        for side, (name, overrides, settings) in jobs.items():
            if args.only and side != args.only:
                if index < len(reused):
                    run[side] = reused[index]
                continue
            print(f"run {index + 1}/{args.repeats}, {name}: {settings} ...", flush=True)
            job = run_job(
                name,
                [
                    *IDX_SETUP,
                    *heterogeneity,
                    *overrides,
                    f"stop_at_accuracy={args.target}",
                    f"seed={args.seed}",
                ],
                RUNS / f"async_vs_sync{suffix}" / f"run{index + 1}" / side,
                env=env,
            )
            history = _history(job)
            run[side] = {"name": name, "settings": settings, "job": job.to_dict(), **history}
            print(
                f"  -> versions {len(job.versions)}, to target: {history['versions_to_target']}, "
                f"train s {history['seconds_to_target']}, wall {job.wall_s:.0f} s, "
                f"load {job.load_avg[0]:.1f}->{job.load_avg[1]:.1f}",
                flush=True,
            )
        results["runs"].append(run)
        write_json(out, results)
    results["wall_s"] = time.perf_counter() - started
    text = report(results)
    results["table"] = text
    write_json(out, results)
    print()
    print(text)


def _reused_side(
    only: str | None, files: tuple[Path, ...], results: dict[str, Any]
) -> list[dict[str, Any]]:
    """With ``--only``, the other side's runs from the first of ``files`` that has them (older
    files hold one run under ``jobs``); names the file in ``results["reused"]``."""
    if not only:
        return []
    other = "sync" if only == "async" else "async"
    for earlier in files:
        if not earlier.exists():
            continue
        data = json.loads(earlier.read_text())
        runs = data.get("runs") or ([data["jobs"]] if "jobs" in data else [])
        found = [run[other] for run in runs if other in run]
        if found:
            results["reused"] = {other: earlier.name}
            return found
    return []


def averaged(decay: float) -> str:
    """The settings' words for ``strategy.ema_decay``."""
    return f", average of versions (decay {decay:g})" if decay else ""


def async_suffix(args: argparse.Namespace) -> str:
    """FedBuff's settings that differ from the defaults, for the results file's name (so that a
    search over them keeps one file per setting, each with the sync side it is compared to)."""
    parts = [
        f"c{args.concurrency}" if args.concurrency != 10 else "",
        f"k{args.buffer_size}" if args.buffer_size != 5 else "",
        f"s{args.max_staleness}" if args.max_staleness != 10 else "",
        args.selection if args.selection != "balanced" else "",
        (
            f"{args.server_optimizer}{args.server_lr:g}"
            if (args.server_optimizer, args.server_lr) != ("sgd", 1.0)
            else ""
        ),
        f"m{args.server_momentum:g}" if args.server_momentum else "",
        f"clr{args.client_lr:g}" if args.client_lr else "",
        f"ema{args.ema_decay:g}" if args.ema_decay else "",
    ]
    return "".join(f"-{p}" for p in parts if p)


def _history(job: JobResult) -> dict[str, Any]:
    """Versions, client updates and seconds to the target, from the job's history.json."""
    path = Path(job.run_dir) / "history.json"
    rounds = json.loads(path.read_text())["rounds"] if path.exists() else []
    target = float(json.loads((Path(job.run_dir) / "config.json").read_text())["stop_at_accuracy"])
    index = job.first_reaching(target)
    accepted = [int(r.get("counts", {}).get("accepted", 0)) for r in rounds]
    if not any(accepted):  # flower_fedavg keeps no counts; sync: every client once per round
        accepted = [20] * len(rounds)
    return {
        "versions_to_target": None if index is None else job.versions[index],
        "updates_to_target": None if index is None else sum(accepted[: index + 1]),
        "seconds_to_target": job.seconds_to(target),
        "median_s_per_version": median(job.seconds[1:] or job.seconds),
        "best_acc": max(job.test_acc, default=float("nan")),
    }


if __name__ == "__main__":
    main()
