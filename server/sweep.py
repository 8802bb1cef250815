"""The table and the plot at the end of a Hydra sweep (``fedserve-train -m ...``).

A Hydra callback: after the last job, it reads every job's ``history.json`` under the sweep
directory, writes ``summary.md`` (final and best test accuracy per job) and ``summary.png`` (the
curves side by side), and logs the table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from server.history import History, plot_history

log = logging.getLogger(__name__)


def summarize_sweep(sweep_dir: Path) -> str:
    """Write ``summary.md`` and ``summary.png`` for the jobs in ``sweep_dir``; return the table."""
    jobs: list[tuple[list[str], str, History]] = []
    for history_file in sorted(sweep_dir.glob("*/history.json"), key=_job_order):
        job_dir = history_file.parent
        overrides_file = job_dir / "overrides.txt"
        words = overrides_file.read_text().split() if overrides_file.exists() else []
        history = History.from_dict(json.loads(history_file.read_text()))
        jobs.append((words, job_dir.name, history))
    # label each job by what varies across the sweep, not by the overrides every job shares
    shared = set.intersection(*(set(words) for words, _, _ in jobs)) if len(jobs) > 1 else set()
    rows = [
        (" ".join(w for w in words if w not in shared) or name, history)
        for words, name, history in jobs
    ]
    lines = [
        "| job | swept overrides | versions | final test acc | best test acc |",
        "|---|---|---|---|---|",
    ]
    for index, (label, history) in enumerate(rows):
        lines.append(
            f"| {index} | {label} | {len(history.entries)} | "
            f"{history.final_acc:.4f} | {history.best_acc:.4f} |"
        )
    table = "\n".join(lines)
    (sweep_dir / "summary.md").write_text(table + "\n")
    if rows:
        plot_history({label: history for label, history in rows}, sweep_dir / "summary.png")
    return table


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
