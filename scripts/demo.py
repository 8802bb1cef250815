"""``make demo``: train on digits while serving every new global version, and check them against
each other.

1. Starts ``fedserve-serve`` on a fresh model repository (a free 127.0.0.1 port, its own process
   group), then ``fedserve-train`` (10 clients, 5 rounds, ``fedadam``, the FedAvg CNN) publishing
   every global version into that repository.
2. While it trains, asks the server for one test image every 20 ms (KServe v2, binary tensors);
   the first answer of a new version ends that version's train->serve latency, which starts when
   the trainer had the new global parameters (``timing.params_at`` in history.json/metadata.json).
3. Sends the whole test set - the exact tensors the trainer evaluates on,
   ``task.data.load_dataset`` - to that version (``/v2/models/fedserve/versions/<v>/infer``) and
   prints, per round, the served version, the served accuracy, the accuracy torch measured
   (history.json) and the latency.
4. Stops everything it started, also on Ctrl-C or an error, and exits 1 when a check fails:
   served accuracy == torch accuracy (to 1e-9) for every version, the final accuracy reaches
   ``--min-accuracy`` (0.90), every round was published and served.

``python -m scripts.demo --help`` (from the repository root) lists the knobs; anything after ``--``
goes to fedserve-train as Hydra overrides. The pipeline run (:mod:`scripts.demo_pipeline`) is
used by ``benchmarks.serving.train_to_serve`` too.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from scripts.demo_client import DemoFailed
from scripts.demo_pipeline import PipelineResult, VersionRecord, run_pipeline
from scripts.demo_processes import PROJECT_DIR


def _fmt(value: float | None, spec: str = ".4f", missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--strategy", default="fedadam")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument(
        "--min-accuracy", type=float, default=0.90, help="final torch test accuracy to reach"
    )
    parser.add_argument(
        "--target-latency", type=float, default=2.0, help="reported, not enforced (shared CPUs)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where the repository, logs and history go (default outputs/demo-<time>)",
    )
    parser.add_argument("overrides", nargs="*", help="extra fedserve-train overrides (after --)")
    return parser.parse_args(argv)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = (args.workdir or PROJECT_DIR / "outputs" / f"demo-{stamp}").resolve()
    train_overrides = [
        f"dataset={args.dataset}",
        f"model={args.model}",
        f"strategy={args.strategy}",
        f"rounds={args.rounds}",
        f"num_clients={args.clients}",
        *args.overrides,
    ]
    print(
        f"fedserve demo: {args.clients} clients x {args.rounds} rounds of {args.strategy} on "
        f"{args.dataset} ({args.model}), every version served while training goes on\n"
        f"  outputs in {workdir}",
        flush=True,
    )
    header = (
        f"{'round':>5} | {'version':>7} | {'served acc':>10} | {'torch acc':>9} | "
        f"{'agree':>5} | {'train->serve':>12}"
    )
    printed_header = False

    def show(record: VersionRecord) -> None:
        nonlocal printed_header
        if not printed_header:
            print(header + "\n" + "-" * len(header), flush=True)
            printed_header = True
        served = record.served["demo"]
        latency = record.latency("demo")
        print(
            f"{record.round:>5} | {record.version:>7} | {_fmt(served.accuracy):>10} | "
            f"{record.torch_acc:>9.4f} | {'yes' if record.agrees('demo') else 'NO':>5} | "
            f"{_fmt(latency, '.3f'):>10} s",
            flush=True,
        )

    try:
        result = run_pipeline(
            workdir,
            train_overrides,
            {"demo": ["serving.versions=2"]},  # the newest two: the previous one stays queryable
            on_record=show,
        )
    except KeyboardInterrupt:
        print("interrupted: stopped everything the demo started", flush=True)
        return 130
    except DemoFailed as err:
        print(f"FAILED: {err}", flush=True)
        return 1
    return report(result, args, workdir)


def report(result: PipelineResult, args: argparse.Namespace, workdir: Path) -> int:
    failures: list[str] = []
    if result.train_returncode != 0:
        failures.append(
            f"fedserve-train exited with {result.train_returncode}; see {workdir / 'train.log'}"
        )
    rounds = result.history.get("rounds", [])
    early_stop = any(o.startswith("stop_at_accuracy=") for o in args.overrides)
    if not rounds or len(rounds) > args.rounds or (len(rounds) < args.rounds and not early_stop):
        failures.append(f"history.json has {len(rounds)} versions, expected {args.rounds}")
    unexported = [r["version"] for r in rounds if r.get("exported_version") is None]
    if unexported:
        failures.append(f"global versions {unexported} were not exported; see train.log")
    for record in result.records:
        served = record.served.get("demo")
        if served is None or served.accuracy is None:
            failures.append(f"version {record.version} was never served")
        elif not record.agrees("demo"):
            failures.append(
                f"version {record.version}: served accuracy {served.accuracy:.6f} != torch "
                f"accuracy {record.torch_acc:.6f} (an argmax near-tie flipped between "
                "onnxruntime and torch?)"
            )
    final = result.history.get("final_test_acc")
    if final is None or not final >= args.min_accuracy:
        failures.append(f"final test accuracy {final} is below --min-accuracy={args.min_accuracy}")
    if not all(result.servers_alive.values()):
        failures.append("fedserve-serve died during the run")
    latencies = [x for r in result.records if (x := r.latency("demo")) is not None]
    print("", flush=True)
    if latencies:
        median = statistics.median(latencies)
        verdict = "met" if median <= args.target_latency else "NOT met on this machine"
        print(
            f"train->serve latency: median {median:.3f} s, max {max(latencies):.3f} s over "
            f"{len(latencies)} versions (target <= {args.target_latency:g} s: {verdict})",
            flush=True,
        )
    print(f"demo took {result.seconds:.1f} s; outputs in {workdir}", flush=True)
    if failures:
        for failure in failures:
            print(f"CHECK FAILED: {failure}", flush=True)
        return 1
    print(
        f"all checks passed: served accuracy == torch accuracy for all {len(result.records)} "
        f"versions, final test accuracy {final:.4f} >= {args.min_accuracy:g}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
