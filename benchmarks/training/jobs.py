"""One ``fedserve-train`` job of a training benchmark: run it, watch and read its history.

Each job is one ``fedserve-train`` subprocess (one Flower simulation). The job's environment carries
a unique marker, inherited by everything it starts (SuperLink, simulation, Ray workers); after the
job the marker is looked for in ``/proc/*/environ`` so no process of a job outlives it unnoticed
(stragglers are reported and killed; they are ours by construction).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, write_json
from server.processes import marked_processes, marker_env, stop_process_group

RUNS = ROOT / "outputs" / "benchmarks"  # gitignored: per-job Hydra dirs and logs
TRAIN = Path(sys.executable).parent / "fedserve-train"
MNIST = Path(os.environ.get("FEDSERVE_MNIST", ROOT.parent / "shared" / "data" / "mnist")).resolve()
MARKER = "FEDSERVE_BENCH_JOB"
JOB_FILE = "job.json"  # a finished job's JobResult, next to its history.json
ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}

# The MNIST setup: idx over ../shared/data/mnist (8,000 train / 2,000 test), 20 clients,
# Dirichlet(0.3) label skew, the FedAvg CNN, 1 local epoch of batch 32, no ONNX export.
IDX_SETUP = [
    "dataset=idx",
    f"dataset.root={MNIST}",
    "dataset.test_fraction=0.2",
    "num_clients=20",
    "partition=dirichlet",
    "partition.alpha=0.3",
    "model=cnn",
    "train.local_epochs=1",
    "train.batch_size=32",
    "repository=null",
    "export=off",  # belt and braces: no ONNX export, whatever `repository` reaches the ServerApp
]


@dataclass
class JobResult:
    """One ``fedserve-train`` job: its history per version and how long it took."""

    name: str
    overrides: list[str]
    returncode: int
    wall_s: float  # the subprocess, start-up (SuperLink, Ray, nodes) included
    versions: list[int] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # per version, from history.json
    stopped: str | None = None  # why the benchmark ended the job early (None: it ended itself)
    leftover_processes: int = 0
    load_avg: tuple[float, float] = (0.0, 0.0)  # 1-min load average at start and at end
    run_dir: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 or self.stopped is not None

    def first_reaching(self, target: float) -> int | None:
        """Index into ``versions`` of the first version with test accuracy >= ``target``."""
        return next((i for i, acc in enumerate(self.test_acc) if acc >= target), None)

    def rounds_to(self, target: float) -> int | None:
        i = self.first_reaching(target)
        return None if i is None else self.versions[i]

    def seconds_to(self, target: float) -> float | None:
        """Sum of history ``seconds`` up to the first version reaching ``target``."""
        i = self.first_reaching(target)
        return None if i is None else float(sum(self.seconds[: i + 1]))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobResult:
        data = dict(data)
        data["load_avg"] = tuple(data.get("load_avg", (0.0, 0.0)))
        return cls(**data)


Watch = Callable[[list[dict[str, Any]]], str | None]


def run_job(
    name: str,
    overrides: Sequence[str],
    run_dir: Path,
    *,
    timeout_s: float = 3600.0,
    watch: Watch | None = None,
    log_file: Path | None = None,
    env: dict[str, str] | None = None,
) -> JobResult:
    """Run ``fedserve-train <overrides> hydra.run.dir=<run_dir>`` and read its history.

    ``watch(history_rounds)`` is called every few seconds with the versions written so far; a
    string return ends the job (SIGINT, so the launcher stops its SuperLink) and is recorded as
    the reason in ``JobResult.stopped``. ``env`` adds to the job's environment.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    history_file = run_dir / "history.json"
    history_file.unlink(missing_ok=True)
    (run_dir / JOB_FILE).unlink(missing_ok=True)
    marker = uuid.uuid4().hex
    job_env = {**os.environ, **ENV, **(env or {}), **marker_env(marker, MARKER)}
    command = [str(TRAIN), *overrides, f"hydra.run.dir={run_dir}"]
    log_path = log_file or run_dir / "train.log"
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    stopped: str | None = None
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=job_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # A benchmark started with `&` ignores SIGINT, and so would the job: restore it, the
            # job is stopped with SIGINT so that the launcher stops its SuperLink.
            preexec_fn=_default_sigint,
        )
        try:
            while process.poll() is None:
                time.sleep(2.0)
                if time.perf_counter() - started > timeout_s:
                    stopped = f"timeout after {timeout_s:.0f} s"
                elif watch is not None:
                    stopped = watch(read_history(history_file))
                if stopped:
                    stop_process_group(process, grace=30.0, first=signal.SIGINT)
                    break
        finally:
            if process.poll() is None:
                stop_process_group(process, grace=30.0, first=signal.SIGINT)
    wall = time.perf_counter() - started
    leftovers = reap_marked(marker)
    rounds = read_history(history_file)
    result = JobResult(
        name=name,
        overrides=list(overrides),
        returncode=int(process.returncode),
        wall_s=wall,
        versions=[int(r["version"]) for r in rounds],
        test_acc=[float(r["test_acc"]) for r in rounds],
        seconds=[float(r["seconds"]) for r in rounds],
        stopped=stopped,
        leftover_processes=leftovers,
        load_avg=(load_start, os.getloadavg()[0]),
        run_dir=str(run_dir),
    )
    write_json(run_dir / JOB_FILE, result.to_dict())
    return result


def load_job(run_dir: Path) -> JobResult | None:
    """The :class:`JobResult` a finished job left in its directory, if any."""
    path = run_dir / JOB_FILE
    try:
        return JobResult.from_dict(json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def exit_on_sigterm() -> None:
    """Make SIGTERM (and SIGINT, even when started with ``&``) end a benchmark through its
    ``finally`` blocks, so the running job is stopped and reaped too."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def read_history(path: Path) -> list[dict[str, Any]]:
    """The ``rounds`` of a ``history.json`` (written atomically by the server), [] if none yet."""
    try:
        return list(json.loads(path.read_text()).get("rounds", []))
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def reap_marked(marker: str, settle_s: float = 15.0) -> int:
    """Wait up to ``settle_s`` for a job's processes to exit; kill and count any that remain."""
    deadline = time.monotonic() + settle_s
    while (
        pids := [p.pid for p in marked_processes(marker, MARKER)]
    ) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if pids:
        print(f"  WARNING: {len(pids)} process(es) of the job outlived it; killed {pids}")
    return len(pids)
