"""The chaos benchmark's training rows: the trainer under signals, faulty clients vs a clean run.

    .venv/bin/python -m benchmarks.chaos.training [--quick]        # these rows alone, as a table

:func:`rows` is what the chaos benchmark's runner prints with the serving rows. Every row is real
``fedserve-train`` runs (one Flower simulation each, :func:`benchmarks.training.jobs.run_job`),
with the clients' faults injected by ``faults.*`` (``client/faults.py``):

* **SIGTERM / SIGINT / SIGKILL** of the trainer once version 2 is checkpointed: seconds from the
  signal until the trainer and every process it started (found by the job's environment marker)
  are gone, the processes left after 60 s, the exit code, and whether ``resume=true`` then ends
  bit-identical to an uninterrupted run (the final checkpoints' arrays, byte for byte).
* **30% crashing clients**, **30% straggling clients** (past ``strategy.round_timeout_s``): the
  run completes; its final accuracy against the clean run's; rejections and timeouts as counted.
* **one x1000 / NaN / wrong-shape client** under the default config: the final accuracy within 1
  point of the clean run's, and no version published worse than chance.

The default config is conf/'s (digits, the cnn, 10 clients, 5 rounds) without ONNX export;
``--quick`` runs the mlp for fewer rounds (what the ``-m slow`` tests run).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS, machine, table, write_json
from benchmarks.training.jobs import ENV, MARKER, RUNS, TRAIN, JobResult, read_history, run_job
from server.checkpoint import CHECKPOINT_NAME, load_checkpoint
from server.processes import marked_processes, marker_env

#: the default config, no export (the rows are about training)
DEFAULT = ["repository=null"]
QUICK = ["repository=null", "model=mlp"]
STRAGGLE_TIMEOUT_S = 15.0  # a round waits this long for a straggler
CHANCE = 0.1  # 10 classes


@dataclass
class TrainingRow:
    """One row (the chaos runner's row shape): the fault, the measured figure, the target, met
    or not, and the numbers behind it."""

    fault: str
    figure: str
    target: str
    ok: bool
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Setup:
    base: list[str]
    rounds: int
    signal_rounds: int  # long enough to be signalled mid-run
    runs: Path


def setup(quick: bool, runs: Path | None = None) -> Setup:
    root = runs or RUNS / ("chaos-training-quick" if quick else "chaos-training")
    if quick:
        return Setup(QUICK, rounds=3, signal_rounds=6, runs=root)
    return Setup(DEFAULT, rounds=5, signal_rounds=8, runs=root)


def rows(args: argparse.Namespace | None = None) -> list[TrainingRow]:
    """Every training row (``args.training_quick``: the quick setup)."""
    s = setup(bool(getattr(args, "training_quick", False)))
    return signal_rows(s) + fault_rows(s)


# ------------------------------------------------------------------ faulty clients
def fault_rows(s: Setup) -> list[TrainingRow]:
    """Clean, then 30% crashing, 30% straggling, one x1000 / NaN / wrong-shape client."""
    rounds = [f"rounds={s.rounds}"]
    clean = run_job("clean", [*s.base, *rounds], s.runs / "clean")
    out = [
        _completes(
            "30% of clients crash (every round)",
            run_job("crash", [*s.base, *rounds, "faults.crash_fraction=0.3"], s.runs / "crash"),
            clean,
            s.rounds,
        ),
        _completes(
            f"30% of clients straggle past the {STRAGGLE_TIMEOUT_S:g} s round deadline",
            run_job(
                "straggle",
                [
                    *s.base,
                    *rounds,
                    "faults.straggle_fraction=0.3",
                    f"strategy.round_timeout_s={STRAGGLE_TIMEOUT_S}",
                ],
                s.runs / "straggle",
            ),
            clean,
            s.rounds,
        ),
    ]
    for kind, label in (("scale", "x1000"), ("nan", "NaN"), ("wrong_shape", "wrong-shape")):
        job = run_job(kind, [*s.base, *rounds, f"faults.{kind}_fraction=0.1"], s.runs / kind)
        out.append(_within_a_point(f"one {label} client (default config)", job, clean, s.rounds))
    return out


def _counts(job: JobResult) -> dict[str, int]:
    """The replies' outcomes summed over the run's versions (history ``counts``)."""
    total: dict[str, int] = {}
    for entry in read_history(Path(job.run_dir) / "history.json"):
        for key, value in entry.get("counts", {}).items():
            total[key] = total.get(key, 0) + int(value)
    return total


def _final(job: JobResult) -> float:
    return job.test_acc[-1] if job.test_acc else float("nan")


def _details(job: JobResult, clean: JobResult) -> dict[str, Any]:
    return {
        "overrides": job.overrides,
        "returncode": job.returncode,
        "versions": job.versions,
        "test_acc": job.test_acc,
        "clean_test_acc": clean.test_acc,
        "counts": _counts(job),
        "wall_s": job.wall_s,
        "leftover_processes": job.leftover_processes,
    }


def _outcomes(counts: dict[str, int]) -> str:
    shown = {k: v for k, v in counts.items() if k != "accepted" and v and k != "rejected"}
    return ", ".join(f"{k} {v}" for k, v in sorted(shown.items())) or "none rejected"


def _completes(fault: str, job: JobResult, clean: JobResult, rounds: int) -> TrainingRow:
    done = job.returncode == 0 and len(job.versions) == rounds
    delta = 100 * (_final(job) - _final(clean))
    counts = _counts(job)
    return TrainingRow(
        fault=fault,
        figure=(
            f"{len(job.versions)}/{rounds} versions, final acc {_final(job):.3f} vs clean "
            f"{_final(clean):.3f} ({delta:+.1f} pts); {_outcomes(counts)}"
        ),
        target="run completes",
        ok=done and job.leftover_processes == 0,
        details=_details(job, clean),
    )


def _within_a_point(fault: str, job: JobResult, clean: JobResult, rounds: int) -> TrainingRow:
    done = job.returncode == 0 and len(job.versions) == rounds
    delta = 100 * (_final(job) - _final(clean))
    worst = min(job.test_acc, default=float("nan"))
    return TrainingRow(
        fault=fault,
        figure=(
            f"final acc {_final(job):.3f} vs clean {_final(clean):.3f} ({delta:+.1f} pts), "
            f"worst version {worst:.3f}; {_outcomes(_counts(job))}"
        ),
        target="within 1 point of clean, no version at chance",
        ok=done and abs(delta) <= 1.0 and worst > 2 * CHANCE,
        details=_details(job, clean),
    )


# ------------------------------------------------------------------ signals
def signal_rows(s: Setup) -> list[TrainingRow]:
    """SIGTERM, SIGINT, SIGKILL mid-run, each then resumed, against one uninterrupted run."""
    overrides = [*s.base, f"rounds={s.signal_rounds}"]
    straight = run_job("straight", overrides, s.runs / "straight")
    reference = _arrays(Path(straight.run_dir))
    return [
        signal_row(signum, overrides, s.runs / signum.name.lower(), reference)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL)
    ]


def signal_row(
    signum: signal.Signals,
    overrides: list[str],
    run_dir: Path,
    reference: dict[str, np.ndarray] | None,
    *,
    after_version: int = 2,
    settle_s: float = 60.0,
) -> TrainingRow:
    """Signal the trainer once ``after_version`` is checkpointed; time the stop, count what is
    left, resume and compare with ``reference`` (the uninterrupted run's final arrays)."""
    stopped = _signalled_run(signum, overrides, run_dir, after_version, settle_s)
    resumed = run_job(f"{signum.name}-resume", [*overrides, "resume=true"], run_dir)
    arrays = _arrays(run_dir)
    identical = (
        reference is not None
        and arrays is not None
        and arrays.keys() == reference.keys()
        and all(arrays[k].tobytes() == reference[k].tobytes() for k in reference)
    )
    expected_rc = None if signum == signal.SIGKILL else 128 + signum
    bound = 10.0 if signum == signal.SIGKILL else 3.0
    ok = (
        stopped["stop_s"] <= bound
        and stopped["left"] == 0
        and (expected_rc is None or stopped["returncode"] == expected_rc)
        and resumed.returncode == 0
        and identical
    )
    return TrainingRow(
        fault=f"trainer {signum.name} mid-run",
        figure=(
            f"stopped in {stopped['stop_s']:.1f} s (exit {stopped['returncode']}), "
            f"{stopped['left']} processes left; resumed from version {stopped['version']}: "
            f"{'bit-identical' if identical else 'DIFFERENT'}"
        ),
        target=f"stop <= {bound:g} s, 0 left, resume bit-identical",
        ok=ok,
        details={**stopped, "resume_returncode": resumed.returncode, "identical": identical},
    )


def _signalled_run(
    signum: signal.Signals, overrides: list[str], run_dir: Path, after: int, settle_s: float
) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CHECKPOINT_NAME).unlink(missing_ok=True)
    marker = uuid.uuid4().hex
    command = [str(TRAIN), *overrides, f"hydra.run.dir={run_dir}"]
    with open(run_dir / f"{signum.name.lower()}.log", "w") as log:
        process = subprocess.Popen(
            command,
            env={**os.environ, **ENV, **marker_env(marker, MARKER)},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a user's signal reaches the trainer alone
        )
        try:
            _wait_for_checkpoint(run_dir, after, process)
            sent = time.perf_counter()
            process.send_signal(signum)
            stop_s = float("nan")
            while time.perf_counter() - sent < settle_s:
                if process.poll() is not None and not marked_processes(marker, MARKER):
                    stop_s = time.perf_counter() - sent
                    break
                time.sleep(0.05)
        finally:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()
    left = marked_processes(marker, MARKER)
    for proc in left:
        with contextlib.suppress(Exception):
            proc.kill()
    state = load_checkpoint(run_dir / CHECKPOINT_NAME)  # intact, whatever the signal
    return {
        "signal": signum.name,
        "version": None if state is None else int(state["version"]),
        "stop_s": stop_s,
        "left": len(left),
        "returncode": process.returncode,
    }


def _wait_for_checkpoint(
    run_dir: Path, version: int, process: subprocess.Popen[bytes], timeout_s: float = 900.0
) -> int:
    """The checkpointed version once it is ``>= version`` (the run is then mid-training)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the run ended (exit {process.returncode}) before the signal")
        with contextlib.suppress(Exception):  # absent, or being replaced right now
            state = load_checkpoint(run_dir / CHECKPOINT_NAME)
            if state is not None and int(state["version"]) >= version:
                return int(state["version"])
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint of version {version} within {timeout_s:.0f} s")


def _arrays(run_dir: Path) -> dict[str, np.ndarray] | None:
    state = load_checkpoint(run_dir / CHECKPOINT_NAME)
    return None if state is None else {k: np.asarray(v) for k, v in state["arrays"].items()}


# ------------------------------------------------------------------ alone
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.chaos.training", description=__doc__
    )
    parser.add_argument("--quick", action="store_true", help="the mlp, fewer rounds")
    args = parser.parse_args(argv)
    s = setup(args.quick)
    result = signal_rows(s) + fault_rows(s)
    text = table(
        ["fault", "measured", "target", "met"],
        [[r.fault, r.figure, r.target, "yes" if r.ok else "NO"] for r in result],
    )
    print(text)
    name = "chaos_training-quick.json" if args.quick else "chaos_training.json"
    write_json(
        RESULTS / name,
        {
            "machine": machine(),
            "command": " ".join(["python -m benchmarks.chaos.training", *(argv or sys.argv[1:])]),
            "table": text,
            "rows": [vars(r) for r in result],
        },
    )
    return 0 if all(r.ok for r in result) else 1


if __name__ == "__main__":
    sys.exit(main())
