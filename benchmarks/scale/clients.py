"""How the cost of a round grows with the number of clients: 10, 100 and 1,000 simulated clients,
our sync parameter server (``strategy=fedavg``) next to Flower's own FedAvg
(``strategy=flower_fedavg``), in one run.

Each (strategy, clients) cell is one ``fedserve-train`` job (a private SuperLink and Ray, as a user
runs it) of ``--rounds`` rounds in which every client trains (``fraction_train=1``) one local epoch
of the ``mlp`` (784-200-200-10, 0.8 MB of float32). The data is ``synthetic`` 28x28 images, 20,000
samples (16,000 to train): digits' 1,438 training samples would leave 1,000 clients one sample
each. The training set is fixed, so every round trains the same 16,000 samples however many
clients share them: what grows with the clients is the overhead, not the work.

Per cell it prints:

* ``start-up``: launch to the start of round 1 (SuperLink, Ray, node registration, and for ours the
  discovery query, during which each client loads its partition);
* ``round``: the median time between consecutive global versions over rounds 2..R (round 1 also
  warms every actor up), the same clock for both strategies: each version's ``made_at`` stamp, so
  a round includes the server's evaluation and bookkeeping of the version before (ours
  checkpoints every version, Flower's FedAvg keeps no state to checkpoint);
* ``training``: the clients' local training alone (``task.training.train`` over every partition,
  timed here in one process with one torch thread, the median of three, divided by the Ray
  actors working at once): an estimate, since the clients share the machine with the server;
* ``overhead``: ``round - training``, in total and per client: messaging, Ray tasks, model
  (de)serialisation, aggregation, evaluation. The training work is the same for both strategies
  at a given size, so their rounds compare directly;
* the server process's peak memory (VmHWM of ``flwr-simulation``, which runs the ServerApp and the
  Simulation Engine) and its peak open files and threads, sampled every 0.5 s.

Each size runs the two strategies ``--repeats`` times (default 2) in alternating order (ours first,
then Flower's first, ...), and a cell reports the median of its runs (peaks: the highest). A round
at 100 clients is ~100 ClientApp calls on the 2 actors, and their time follows the machine's load
(35 to 60 ms per call within one job on a shared 2-core machine): two jobs run one after the other
see different loads, and with one run each, always in the same order, that drift can pass for a
difference between the strategies.

Run from the repository root, alone on the machine:
``python -m benchmarks.scale.clients`` (``--quick``: 10 and 100 clients, 3 rounds, one run each).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from benchmarks.common import RESULTS, machine, median, table, write_json
from benchmarks.training.jobs import RUNS, exit_on_sigterm, run_job
from server.config_loader import compose_experiment
from server.processes import marked_processes, marker_env
from task.federated import client_data
from task.models import build_model
from task.training import make_loader, train

SIZES = (10, 100, 1000)
STRATEGIES = ("fedavg", "flower_fedavg")
LABELS = {"fedavg": "ours (sync parameter server)", "flower_fedavg": "Flower's FedAvg"}
ACTORS = 2  # Ray actors at once: this machine's CPUs at simulation.client_cpus=1
SETUP = [
    "dataset=synthetic",
    "dataset.num_samples=20000",
    "dataset.image_size=28",
    "model=mlp",
    "train.local_epochs=1",
    "strategy.fraction_train=1.0",
    "repository=null",
    "export=off",
]
SERVER_PROCESS = "flwr-simulation"
SAMPLE_MARKER = "FEDSERVE_SCALE_SAMPLE"


@dataclass
class Peaks:
    """The highest values seen in the server process (``flwr-simulation``) of one job."""

    rss_mib: float = 0.0
    open_files: int = 0
    threads: int = 0


class Sampler(threading.Thread):
    """Samples the job's server process every ``interval`` s until stopped."""

    def __init__(self, marker: str, interval: float = 0.5) -> None:
        super().__init__(name="scale-sampler", daemon=True)
        self.marker, self.interval = marker, interval
        self.peaks = Peaks()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            for proc in marked_processes(self.marker, SAMPLE_MARKER):
                try:
                    if SERVER_PROCESS not in " ".join(proc.cmdline()):
                        continue
                    hwm = _vm_hwm_kib(proc.pid)
                    self.peaks.rss_mib = max(self.peaks.rss_mib, hwm / 1024)
                    self.peaks.open_files = max(self.peaks.open_files, proc.num_fds())
                    self.peaks.threads = max(self.peaks.threads, proc.num_threads())
                except (psutil.Error, OSError):
                    continue


def _vm_hwm_kib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1])
    return 0.0


@dataclass
class Cell:
    strategy: str
    clients: int
    returncode: int
    startup_s: float = float("nan")
    first_round_s: float = float("nan")
    round_s: float = float("nan")
    rounds_s: list[float] = field(default_factory=list)
    training_s: float = float("nan")
    peaks: Peaks = field(default_factory=Peaks)
    wall_s: float = float("nan")
    run_dir: str = ""
    runs_round_s: list[float] = field(default_factory=list)  # each run's round, when combined

    @property
    def overhead_s(self) -> float:
        return self.round_s - self.training_s

    def row(self) -> list[Any]:
        per_client_ms = 1000 * self.overhead_s / self.clients
        return [
            self.clients,
            LABELS[self.strategy],
            self.startup_s,
            self.first_round_s,
            self.round_s,
            self.training_s,
            self.overhead_s,
            per_client_ms,
            self.peaks.rss_mib,
            self.peaks.open_files,
            self.peaks.threads,
        ]


HEADERS = [
    "clients",
    "strategy",
    "start-up s",
    "round 1 s",
    "round s (median 2..R)",
    "training s/round",
    "overhead s/round",
    "overhead ms/client",
    "server peak MiB",
    "peak fds",
    "peak threads",
]


def local_training_s(clients: int, seed: int = 0, repeats: int = 3) -> float:
    """Seconds of one round of local training of ``clients`` clients on ``ACTORS`` actors: every
    partition's ``train`` (model build and data loading excluded), timed here on one thread."""
    cfg = compose_experiment([*SETUP, f"num_clients={clients}", f"seed={seed}"])
    torch.set_num_threads(1)
    totals = []
    for _ in range(repeats):
        total = 0.0
        for partition in range(clients):
            data = client_data(cfg, partition, clients)
            model = build_model(cfg.model.name, data.input_shape, data.num_classes)
            loader = make_loader(data.train_x, data.train_y, cfg.train.batch_size, True, seed)
            started = time.perf_counter()
            train(model, loader, cfg.train, torch.device("cpu"))
            total += time.perf_counter() - started
        totals.append(total)
    return median(totals) / ACTORS


def run_cell(strategy: str, clients: int, rounds: int, out_dir: Path) -> Cell:
    marker = uuid.uuid4().hex
    run_dir = out_dir / f"{strategy}-{clients}"
    overrides = [*SETUP, f"strategy={strategy}", f"num_clients={clients}", f"rounds={rounds}"]
    sampler = Sampler(marker)
    sampler.start()
    launched = time.time()
    try:
        job = run_job(
            f"{strategy}-{clients}",
            overrides,
            run_dir,
            timeout_s=3600,
            env=marker_env(marker, SAMPLE_MARKER),
        )
    finally:
        sampler.done.set()
        sampler.join()
    cell = Cell(strategy, clients, job.returncode, peaks=sampler.peaks, wall_s=job.wall_s)
    cell.run_dir = str(run_dir)
    history = run_dir / "history.json"
    if job.returncode != 0 or not history.exists():
        return cell
    entries = json.loads(history.read_text())["rounds"]
    made_at = [float(e["timing"]["params_at"]) for e in entries]
    round_1_start = made_at[0] - float(entries[0]["seconds"])
    cell.startup_s = round_1_start - launched
    cell.first_round_s = made_at[0] - round_1_start
    cell.rounds_s = [b - a for a, b in zip([round_1_start, *made_at[:-1]], made_at, strict=True)]
    cell.round_s = median(cell.rounds_s[1:]) if len(made_at) > 1 else cell.first_round_s
    return cell


def run_order(repeat: int) -> tuple[str, ...]:
    """The strategies in the order run ``repeat`` (0, 1, ...) runs them: alternated, so that a
    drift of the machine's load between two consecutive jobs favours neither of them."""
    return STRATEGIES if repeat % 2 == 0 else STRATEGIES[::-1]


def combine(runs: list[Cell]) -> Cell:
    """One cell from the runs of one (strategy, clients): the median of each time over the runs
    (NaN runs, failed ones, left out), the highest peaks, the first failing return code."""
    if not runs or len({(r.strategy, r.clients) for r in runs}) != 1:
        raise ValueError("combine() takes the runs of one (strategy, clients) cell")
    first = runs[0]
    peaks = Peaks(
        rss_mib=max(r.peaks.rss_mib for r in runs),
        open_files=max(r.peaks.open_files for r in runs),
        threads=max(r.peaks.threads for r in runs),
    )
    return Cell(
        first.strategy,
        first.clients,
        next((r.returncode for r in runs if r.returncode != 0), 0),
        startup_s=median([r.startup_s for r in runs]),
        first_round_s=median([r.first_round_s for r in runs]),
        round_s=median([r.round_s for r in runs]),
        training_s=median([r.training_s for r in runs]),
        peaks=peaks,
        wall_s=statistics.fsum(r.wall_s for r in runs),
        run_dir=first.run_dir,
        runs_round_s=[r.round_s for r in runs],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 and 100 clients, 3 rounds")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--rounds", type=int, default=4, help="rounds per job (median of 2..R)")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs of each cell, in alternating order"
    )
    parser.add_argument("--name", default="scale", help="results/<name>.json, outputs/<name>/")
    args = parser.parse_args()
    exit_on_sigterm()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    sizes = [10, 100] if args.quick else args.sizes
    rounds = 3 if args.quick else args.rounds
    repeats = 1 if args.quick else args.repeats
    name = f"{args.name}-quick" if args.quick else args.name
    out_dir = RUNS / name
    results: dict[str, Any] = {
        "machine": machine(),
        "setup": SETUP,
        "rounds": rounds,
        "repeats": repeats,
    }
    runs: list[Cell] = []
    cells: list[Cell] = []
    for clients in sizes:
        training = local_training_s(clients)
        print(f"{clients} clients: local training {training:.2f} s/round on {ACTORS} actors")
        for repeat in range(repeats):
            for strategy in run_order(repeat):
                run = run_cell(strategy, clients, rounds, out_dir / f"run{repeat + 1}")
                run.training_s = training
                runs.append(run)
                print(" | ".join(str(v) for v in run.row()), f"(rc {run.returncode})", flush=True)
                results["runs"] = [{**asdict(r), "overhead_s": r.overhead_s} for r in runs]
                write_json(RESULTS / f"{name}.json", results)
        for strategy in STRATEGIES:
            cell_runs = [r for r in runs if (r.strategy, r.clients) == (strategy, clients)]
            cells.append(combine(cell_runs))
        results["cells"] = [{**asdict(c), "overhead_s": c.overhead_s} for c in cells]
        write_json(RESULTS / f"{name}.json", results)
    text = table(HEADERS, [cell.row() for cell in cells])
    ratios = []
    for clients in sizes:
        ours, flower = (
            next(c for c in cells if c.clients == clients and c.strategy == s) for s in STRATEGIES
        )
        ratios.append(
            [
                clients,
                ours.overhead_s / flower.overhead_s,
                ours.peaks.rss_mib / flower.peaks.rss_mib,
                ours.startup_s / flower.startup_s,
            ]
        )
    text += "\n\n" + table(
        ["clients", "overhead ours/Flower", "peak memory ours/Flower", "start-up ours/Flower"],
        ratios,
    )
    results["table"] = text
    write_json(RESULTS / f"{name}.json", results)
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
