"""Print the chaos benchmark's one reliability table (see :mod:`benchmarks.chaos`).

    .venv/bin/python -m benchmarks.chaos.run                         # every row, the 10-minute soak
    .venv/bin/python -m benchmarks.chaos.run --rows fuzz,sigterm --soak-minutes 1

Serving rows: :mod:`benchmarks.chaos.serving_rows`; the trainer's rows:
:mod:`benchmarks.chaos.training` (``--no-training`` skips them; ``--training-quick``: the mlp).
Results (every row's details too) go to ``benchmarks/results/chaos.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks.chaos import training
from benchmarks.chaos.serving_rows import ROWS, Row
from benchmarks.common import RESULTS, machine, table, write_json

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos.run", description=__doc__)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"serving rows: {','.join(ROWS)}")
    parser.add_argument("--fuzz-requests", type=int, default=5000)
    parser.add_argument("--soak-minutes", type=float, default=10.0)
    parser.add_argument("--swap-every", type=float, default=20.0, help="soak: seconds per swap")
    parser.add_argument("--no-training", action="store_true", help="skip the trainer's rows")
    parser.add_argument(
        "--training-quick", action="store_true", help="the trainer's rows on the mlp, fewer rounds"
    )
    parser.add_argument("--out", default=str(RESULTS / "chaos.json"))
    return parser.parse_args(argv)


def serving_rows(args: argparse.Namespace) -> list[Row]:
    kwargs: dict[str, dict[str, Any]] = {
        "fuzz": {"requests": args.fuzz_requests},
        "soak": {"minutes": args.soak_minutes, "swap_every_s": args.swap_every},
    }
    rows = []
    for name in [r for r in args.rows.split(",") if r]:
        if name not in ROWS:
            raise SystemExit(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
        logging.info("chaos row %s", name)
        rows.append(ROWS[name](**kwargs.get(name, {})))
    return rows


def training_rows(args: argparse.Namespace) -> list[Any]:
    return [] if args.no_training else list(training.rows(args))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    rows = serving_rows(args) + training_rows(args)
    print(
        table(
            ["fault", "measured", "target", "met"],
            [[r.fault, r.figure, r.target, "yes" if r.ok else "NO"] for r in rows],
        )
    )
    write_json(
        Path(args.out),
        {"machine": machine(), "args": vars(args), "rows": [vars(r) for r in rows]},
    )
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
