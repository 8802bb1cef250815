"""The end-of-sweep summary: one row per job, labelled by what the sweep varied, and a plot."""

from __future__ import annotations

import json
from pathlib import Path

from server.history import History, HistoryEntry
from server.sweep import summarize_sweep


def _job(sweep: Path, index: int, overrides: str, accs: list[float]) -> None:
    job = sweep / str(index)
    job.mkdir(parents=True)
    (job / "overrides.txt").write_text(overrides)
    history = History(
        [
            HistoryEntry(v + 1, v + 1, test_loss=1.0 - a, test_acc=a, seconds=1.0)
            for v, a in enumerate(accs)
        ]
    )
    (job / "history.json").write_text(json.dumps(history.to_dict()))


def test_summary_table_and_plot(tmp_path: Path) -> None:
    for index, (strategy, accs) in enumerate(
        [("fedavg", [0.5, 0.8, 0.7]), ("fedadam", [0.6, 0.9, 0.95])]
    ):
        _job(tmp_path, index, f"strategy={strategy} rounds=3", accs)
    _job(tmp_path, 10, "strategy=fedbuff rounds=3", [0.4])  # job 10 sorts after job 2, not 1

    table = summarize_sweep(tmp_path)

    lines = table.splitlines()
    assert lines[2] == "| 0 | strategy=fedavg | 3 | 0.7000 | 0.8000 |"
    assert lines[3] == "| 1 | strategy=fedadam | 3 | 0.9500 | 0.9500 |"
    assert lines[4] == "| 2 | strategy=fedbuff | 1 | 0.4000 | 0.4000 |"
    assert (tmp_path / "summary.md").read_text().strip() == table
    assert (tmp_path / "summary.png").stat().st_size > 10_000
