"""The results JSON of ``strategies.py``: one cell's entry, earlier cells to reuse, merging.

A cell is reused from the JSON or from its job directory's ``job.json``; a run that covers part of
the grid keeps the cells it did not run (:func:`with_pending`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.training.jobs import JobResult, load_job
from benchmarks.training.strategy_grid import Cell, grid


def resumable(out: Path, runs: Path, cap: int, momentum: float) -> dict[str, Any]:
    """Cells of an earlier run: the results JSON, and any job directory with a ``job.json``."""
    cells: dict[str, Any] = {}
    for cell in grid(momentum=momentum):
        job = load_job(runs / cell.key)
        if job is not None:
            cells[cell.key] = entry_of(cell, cap_of(job, cap), False, job)
    if out.exists():
        for c in json.loads(out.read_text()).get("cells", []):
            if not c.get("skipped"):
                cells[c["key"]] = c
    return cells


def entry_of(cell: Cell, cap: int, pruned: bool, job: JobResult) -> dict[str, Any]:
    """One cell's record in the results JSON."""
    return {
        "key": cell.key,
        "strategy": cell.strategy,
        "client_lr": cell.client_lr,
        "server_lr": cell.server_lr,
        "cap": cap,
        "pruned": pruned,
        "job": job.to_dict(),
    }


def cap_of(job: JobResult, cap: int) -> int:
    """The rounds cap a job ran with (its ``rounds=`` override), else ``cap``."""
    for override in job.overrides:
        if override.startswith("rounds="):
            return int(override.split("=", 1)[1])
    return cap


def reusable(entry: dict[str, Any] | None, cap: int, target: float) -> bool:
    """An earlier cell answers this one: it ran to at least ``cap`` rounds, or ended before its
    own cap (target reached, or diverged), which a smaller cap would not have changed."""
    if entry is None or "job" not in entry:
        return False
    job = JobResult.from_dict(entry["job"])
    if not job.ok:
        return False
    reached = job.rounds_to(target)
    if reached is not None:
        return reached <= cap or entry.get("cap", 0) >= cap
    return entry.get("cap", 0) >= cap or job.stopped is not None


def with_pending(results: dict[str, Any], previous: dict[str, Any]) -> dict[str, Any]:
    """The results so far plus earlier cells not reached yet or not in this run (an interrupted
    or partial run loses none)."""
    done = {c["key"] for c in results["cells"]}
    pending = [c for key, c in previous.items() if key not in done]
    return {**results, "cells": results["cells"] + pending}
