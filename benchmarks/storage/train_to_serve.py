"""Train->serve latency through a model store, next to the local repository (issue 17 item 1).

Two runs of the same training (default: the demo's, 10 clients x 5 rounds of fedadam on digits,
the FedAvg CNN), one after the other, each followed by one ``fedserve-serve``:

- ``local``: the repository is a local directory (the shipped settings: a stat-based change
  check every 0.05 s);
- ``store``: the trainer publishes to ``s3://fedserve-bench/<run>/repo`` on moto's S3 server
  (127.0.0.1, started here), the server follows it with ``serving.store.poll_s=1`` (one LIST a
  second), downloads each version into its cache and checks it against the manifest.

The stages are those of :mod:`benchmarks.serving.train_to_serve` (same table); for the store,
``publish->detect`` holds the upload, the commit (manifest), the wait for the next LIST and the
download. Usage: ``python -m benchmarks.storage.train_to_serve [--rounds 5] [--clients 10]
[--poll 1.0] [--quick] [-- extra fedserve-train overrides]``; results in
``benchmarks/results/train_to_serve_store[-quick].json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.common import RESULTS, machine, table, write_json
from benchmarks.storage.moto_s3 import moto_server, s3_env

BUCKET = "fedserve-bench"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--strategy", default="fedadam")
    parser.add_argument("--poll", type=float, default=1.0, help="serving.store.poll_s")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 4 clients")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--out", type=Path, default=None, help="results JSON (default: benchmarks/results/)"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.clients = 2, 4
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="train-to-serve-store-"))
    train = [
        "dataset=digits",
        f"model={args.model}",
        f"strategy={args.strategy}",
        f"rounds={args.rounds}",
        f"num_clients={args.clients}",
        *args.overrides,
    ]
    print(f"train->serve latency, local vs store, {' '.join(train)}; in {workdir}", flush=True)
    with moto_server() as (host, port):
        # the spawned trainer and server read the store's endpoint and credentials from the
        # standard AWS variables; scripts.demo_processes passes the environment on at each spawn
        os.environ.update(s3_env(f"http://{host}:{port}"))
        import fsspec

        from benchmarks.serving.train_to_serve import STAGES
        from scripts.demo_pipeline import VersionRecord, run_pipeline

        fsspec.filesystem("s3").mkdir(BUCKET)
        url = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}/repo"
        runs = {
            "local": (workdir / "local", None, ["serving.versions=2"]),
            "store": (
                workdir / "store",
                url,
                [
                    "serving.versions=2",
                    f"serving.store.poll_s={args.poll}",
                    f"serving.store.cache_dir={workdir / 'store' / 'cache'}",
                ],
            ),
        }
        records: dict[str, list[VersionRecord]] = {}
        started = time.monotonic()
        for name, (directory, repository, overrides) in runs.items():
            print(f"\n{name}:", flush=True)

            def show(record: VersionRecord, name: str = name) -> None:
                latency = record.latency(name)
                shown = "n/a" if latency is None else f"{latency:.3f} s"
                print(f"  version {record.version}: {shown}", flush=True)

            result = run_pipeline(
                directory, train, {name: overrides}, on_record=show, repository_url=repository
            )
            if result.train_returncode != 0:
                print(f"fedserve-train exited with {result.train_returncode}; see {directory}")
                return 1
            records[name] = result.records

    def medians(first: int) -> list[list[str]]:
        rows = []
        for label, stage in STAGES:
            row = [label]
            for name, recs in records.items():
                served = [r for r in recs[first:] if name in r.served]
                values = [v for r in served if (v := stage(r, name)) is not None]
                row.append(f"{statistics.median(values):.3f}" if values else "n/a")
            rows.append(row)
        return rows

    headers = ["stage (median s)", *records]
    tables = {
        "all": table(headers, medians(0)),
        "from_2": table(headers, medians(1)),
    }
    n = min(len(r) for r in records.values())
    print(f"\nmedians over versions 1..{n}:\n{tables['all']}", flush=True)
    print(f"\nmedians over versions 2..{n}:\n{tables['from_2']}", flush=True)
    suffix = "-quick" if args.quick else ""
    write_json(
        args.out or RESULTS / f"train_to_serve_store{suffix}.json",
        {
            "command": " ".join(
                ["python -m benchmarks.storage.train_to_serve", *(argv or sys.argv[1:])]
            ),
            "train": train,
            "store_poll_s": args.poll,
            "seconds": time.monotonic() - started,
            "latency_s": {name: [r.latency(name) for r in recs] for name, recs in records.items()},
            "table": tables["all"],
            "table_from_version_2": tables["from_2"],
            "machine": machine(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
