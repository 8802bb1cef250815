"""Train->serve latency: from the end of a round to the first response of the new version.

One ``fedserve-train`` run (default: the demo's, 10 clients x 5 rounds of fedadam on digits, the
FedAvg CNN) publishes every global version into a fresh repository that two ``fedserve-serve``
processes watch at the same time:

- ``ours``: the shipped settings (``serving.poll_interval_s=0.05``: a stat-based change check, a
  full poll on a change);
- ``reference``: ``serving.poll_interval_s=0.5``, the previous default.

A client asks each server for one test image every 20 ms; the first answer of version v ends v's
latency, which starts at ``params_at``, the moment the trainer had v's global parameters. The
stages come from the trainer (history.json ``timing``) and the watcher (``swap timing`` log line):

====================  ================================================================
evaluate              central test-set evaluation (the accuracy goes into metadata.json)
export, check         torch -> ONNX, and the onnxruntime-vs-torch parity check
write                 repository files and hashes, up to metadata ``created``
publish->detect       fsync + rename, and the watcher noticing it (poll interval!)
verify, load, warm    checksums + onnx checker; sessions; warm-up runs
swap                  the registry switch (the new version becomes the default)
first response        swap -> first answer of the new version (<= the 20 ms client poll)
total                 params_at -> first response (medians do not add up exactly)
====================  ================================================================

Prints the table of medians over the run's versions (the two columns share the trainer's
stages: same run). Usage: ``python -m benchmarks.serving.train_to_serve [--rounds 5]
[--clients 10] [--model cnn] [--no-reference] [-- extra fedserve-train overrides]``. The run is
the demo's pipeline (:func:`scripts.demo_pipeline.run_pipeline`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from scripts.demo_pipeline import VersionRecord, run_pipeline

Stage = Callable[[VersionRecord, str], float | None]  # (record, server name) -> seconds


def _seconds(value: float | None) -> str:
    return "n/a s" if value is None else f"{value:.3f} s"


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _trainer(key: str) -> Stage:
    return lambda record, name: record.trainer.get(key)


def _watcher(key: str) -> Stage:
    return lambda record, name: record.served[name].timing.get(key)


def _evaluate(record: VersionRecord, name: str) -> float | None:
    return _diff(record.trainer.get("evaluated_at"), record.trainer.get("params_at"))


def _write(record: VersionRecord, name: str) -> float | None:
    t = record.trainer
    if not {"evaluated_at", "export_s", "check_s"} <= set(t):
        return None
    checked = t["evaluated_at"] + t["export_s"] + t["check_s"]
    return _diff(record.served[name].timing.get("published_at"), checked)


def _detect(record: VersionRecord, name: str) -> float | None:
    timing = record.served[name].timing
    return _diff(timing.get("detected_at"), timing.get("published_at"))


def _first_response(record: VersionRecord, name: str) -> float | None:
    served = record.served[name]
    return _diff(served.first_at, served.timing.get("serving_at"))


STAGES: list[tuple[str, Stage]] = [
    ("evaluate", _evaluate),
    ("export", _trainer("export_s")),
    ("check", _trainer("check_s")),
    ("write", _write),
    ("publish->detect", _detect),
    ("verify", _watcher("verify_s")),
    ("build gate", _watcher("gate_s")),
    ("load", _watcher("load_s")),
    ("warm", _watcher("warm_s")),
    ("swap", _watcher("swap_s")),
    ("first response", _first_response),
    ("total", lambda record, name: record.latency(name)),
]


def breakdown(records: list[VersionRecord], servers: list[str]) -> str:
    """The table: one row per stage, one column per server, medians in seconds."""
    head = f"| {'stage (median s)':<18} |" + "".join(f" {name:>10} |" for name in servers)
    lines = [head, "|" + "-" * 20 + "|" + "".join("-" * 12 + "|" for _ in servers)]
    for label, stage in STAGES:
        cells = []
        for name in servers:
            values = [
                value
                for record in records
                if name in record.served and (value := stage(record, name)) is not None
            ]
            cells.append(f"{statistics.median(values):10.3f}" if values else f"{'n/a':>10}")
        lines.append(f"| {label:<18} |" + "".join(f" {c} |" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--strategy", default="fedadam")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--no-reference", action="store_true", help="only the shipped settings (one server)"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="train-to-serve-"))
    servers = {"ours": ["serving.versions=2"]}
    if not args.no_reference:
        servers["reference"] = ["serving.versions=2", "serving.poll_interval_s=0.5"]
    train = [
        "dataset=digits",
        f"model={args.model}",
        f"strategy={args.strategy}",
        f"rounds={args.rounds}",
        f"num_clients={args.clients}",
        *args.overrides,
    ]
    print(f"train->serve latency, {' '.join(train)}; outputs in {workdir}", flush=True)

    def show(record: VersionRecord) -> None:
        latencies = ", ".join(f"{name} {_seconds(record.latency(name))}" for name in servers)
        print(f"  version {record.version}: {latencies}", flush=True)

    result = run_pipeline(workdir, train, servers, on_record=show)
    if result.train_returncode != 0:
        print(f"fedserve-train exited with {result.train_returncode}; see {workdir}/train.log")
        return 1
    # the first version also pays first-call costs; report it separately
    print(f"\nmedians over versions 1..{len(result.records)} ({args.model}):", flush=True)
    print(breakdown(result.records, list(servers)), flush=True)
    if len(result.records) > 1:
        print(f"\nmedians over versions 2..{len(result.records)}:", flush=True)
        print(breakdown(result.records[1:], list(servers)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
