"""Hydra sweeps over ``fedserve-train``: what a job returns to the sweeper, and the summary.

**Objective.** A job returns one number (:func:`objective`): its final test accuracy, to be
maximised, or, when ``stop_at_accuracy`` is set, the rounds (global versions) it took to reach
that accuracy, to be minimised. A job that never reached it scores ``rounds + 1 + (target - best
accuracy)``: worse than any job that did, and closer misses better, so a search still has a
gradient when no trial reaches the target yet. :func:`objective_direction` is that direction; the
Optuna search configs (``conf/search/``) take theirs from it through the
``fedserve_objective_direction`` resolver, and :func:`check_direction` refuses a sweeper told the
opposite before a job trains.

**Summary.** A Hydra callback: after the last job it reads every job's ``history.json`` and
``config.json`` under the sweep directory, writes ``summary.md`` (per job: the swept overrides,
final and best test accuracy, the objective; the best job marked and named under the table) and
``summary.png`` (the curves side by side), and logs the table. The same for a grid sweep
(Hydra's basic sweeper) and an Optuna search.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from server.history import History, plot_history
from task.config import ConfigError

log = logging.getLogger(__name__)

DIRECTION_RESOLVER = "fedserve_objective_direction"
MAXIMIZE, MINIMIZE = "maximize", "minimize"


def objective_direction(stop_at_accuracy: float | None) -> str:
    """``maximize`` (final test accuracy) or, with a target accuracy, ``minimize`` (rounds)."""
    return MAXIMIZE if stop_at_accuracy is None else MINIMIZE


def rounds_to_target(history: History, target: float) -> int | None:
    """The first version whose test accuracy reached ``target`` (None: none did)."""
    return next((e.version for e in history.entries if e.test_acc >= target), None)


def objective(history: History, rounds: int, stop_at_accuracy: float | None) -> float:
    """A job's objective; see the module docstring."""
    if stop_at_accuracy is None:
        return history.final_acc
    reached = rounds_to_target(history, stop_at_accuracy)
    if reached is not None:
        return float(reached)
    best = history.best_acc if history.entries else 0.0
    return rounds + 1 + (stop_at_accuracy - best)


def objective_name(stop_at_accuracy: float | None) -> str:
    if stop_at_accuracy is None:
        return "final test acc"
    return f"rounds to {stop_at_accuracy:g}"


def check_direction(sweeper: Any, stop_at_accuracy: float | None) -> None:
    """ConfigError when an Optuna ``sweeper`` config optimises the objective the wrong way."""
    direction = sweeper.get("direction") if hasattr(sweeper, "get") else None
    if direction is None or "optuna" not in str(sweeper.get("_target_", "")):
        return  # not an optimiser: a grid sweep has no direction
    expected = objective_direction(stop_at_accuracy)
    given = str(getattr(direction, "name", direction))
    if given != expected:
        better = "higher" if expected == MAXIMIZE else "lower"
        raise ConfigError(
            f"hydra.sweeper.direction={given} but this job's objective is the "
            f"{objective_name(stop_at_accuracy)} ({better} is better): pass "
            f"hydra.sweeper.direction={expected}"
        )


@dataclass
class SweepJob:
    """One finished job of a sweep, as its directory tells it."""

    label: str
    history: History
    objective: float
    stop_at_accuracy: float | None

    def formatted_objective(self) -> str:
        if self.stop_at_accuracy is None:
            return f"{self.objective:.4f}"
        reached = rounds_to_target(self.history, self.stop_at_accuracy)
        return str(reached) if reached is not None else f"not reached ({self.objective:.3f})"


def summarize_sweep(sweep_dir: Path) -> str:
    """Write ``summary.md`` and ``summary.png`` for the jobs in ``sweep_dir``; return the text."""
    jobs = _read_jobs(sweep_dir)
    targets = {job.stop_at_accuracy for job in jobs}
    # one objective ranks the jobs only when they share it (a grid may sweep stop_at_accuracy)
    target = next(iter(targets)) if len(targets) == 1 else None
    header = "| job | swept overrides | versions | final test acc | best test acc |"
    rule = "|---|---|---|---|---|"
    with_rounds = any(job.stop_at_accuracy is not None for job in jobs)
    if with_rounds:
        header += " rounds to target |"
        rule += "---|"
    lines = [header, rule]
    for index, job in enumerate(jobs):
        row = (
            f"| {index} | {job.label} | {len(job.history.entries)} | "
            f"{job.history.final_acc:.4f} | {job.history.best_acc:.4f} |"
        )
        if with_rounds:
            row += f" {job.formatted_objective() if job.stop_at_accuracy is not None else '-'} |"
        lines.append(row)
    text = "\n".join(lines)
    best = _best(jobs, target) if len(targets) == 1 else None
    if best is not None:
        job = jobs[best]
        text += (
            f"\n\nBest: job {best} ({job.label}): "
            f"{objective_name(target)} {job.formatted_objective()}"
        )
    (sweep_dir / "summary.md").write_text(text + "\n")
    if jobs:
        plot_history({job.label: job.history for job in jobs}, sweep_dir / "summary.png")
    return text


def _read_jobs(sweep_dir: Path) -> list[SweepJob]:
    found: list[tuple[list[str], str, History, dict[str, Any]]] = []
    for history_file in sorted(sweep_dir.glob("*/history.json"), key=_job_order):
        job_dir = history_file.parent
        overrides_file = job_dir / "overrides.txt"
        words = overrides_file.read_text().split() if overrides_file.exists() else []
        history = History.from_dict(json.loads(history_file.read_text()))
        config_file = job_dir / "config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        found.append((words, job_dir.name, history, config))
    # label each job by what varies across the sweep, not by the overrides every job shares
    shared = set.intersection(*(set(w) for w, _, _, _ in found)) if len(found) > 1 else set()
    jobs = []
    for words, name, history, config in found:
        target = config.get("stop_at_accuracy")
        rounds = int(config.get("rounds", len(history.entries)))
        jobs.append(
            SweepJob(
                label=" ".join(_short(w) for w in words if w not in shared) or name,
                history=history,
                objective=objective(history, rounds, target),
                stop_at_accuracy=target,
            )
        )
    return jobs


def _best(jobs: list[SweepJob], target: float | None) -> int | None:
    scored = [(job.objective, i) for i, job in enumerate(jobs) if job.objective == job.objective]
    if not scored:
        return None
    pick = max if objective_direction(target) == MAXIMIZE else min
    return pick(scored, key=lambda pair: pair[0])[1]


def _short(override: str) -> str:
    """``key=0.13291125735654793`` (an Optuna trial's value) as ``key=0.1329``."""
    key, sep, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    return f"{key}{sep}{number:.4g}" if "." in value or "e" in value.lower() else override


def _job_order(path: Path) -> tuple[int, str]:
    name = path.parent.name
    return (int(name), name) if name.isdigit() else (1 << 30, name)


class SweepSummary(Callback):
    """Hydra callback (``hydra.callbacks.sweep_summary`` in conf/config.yaml)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        table = summarize_sweep(sweep_dir)
        log.info("sweep summary (%s):\n%s", sweep_dir / "summary.md", table)
