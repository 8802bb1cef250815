"""The app's version sink: one history per run, holding what each VersionEvent carries, written
to history.json and checkpointed once; Flower's FedAvg feeds the same sink."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_early_stop import NODES, _scripted_experiment

from server.checkpoint import CHECKPOINT_NAME, load_checkpoint

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def test_the_one_history_holds_client_evaluation_counts_and_update_norms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    strategy = {"name": "fedavg", "fraction_evaluate": 0.5}
    _scripted_experiment(tmp_path, monkeypatch, rounds=2, strategy=strategy)
    rounds = json.loads((tmp_path / "history.json").read_text())["rounds"]
    assert [r["version"] for r in rounds] == [1, 2]
    for entry in rounds:
        assert entry["counts"]["accepted"] == len(NODES)
        assert entry["update_norm"] > 0
        # two of the four partitions evaluated (their num-examples: 10 + 3 p)
        assert entry["client_eval"]["num-examples"] in {
            20 + 3 * (a + b) for a in range(4) for b in range(a)
        }
    checkpoint = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert checkpoint is not None and checkpoint["history"]["rounds"] == rounds


def test_flower_fedavg_feeds_the_same_sink_without_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    strategy = {"name": "flower_fedavg", "implementation": "flower_fedavg"}
    _scripted_experiment(tmp_path, monkeypatch, rounds=2, strategy=strategy)
    rounds = json.loads((tmp_path / "history.json").read_text())["rounds"]
    assert [r["version"] for r in rounds] == [1, 2]
    assert all(
        r["counts"] == {"accepted": 4, "rejected": 0, "dropped": 0, "timed_out": 0} for r in rounds
    )
    assert all(r["update_norm"] > 0 and r["client_metrics"]["train-loss"] > 0 for r in rounds)
    assert not (tmp_path / CHECKPOINT_NAME).exists()  # Flower's FedAvg keeps no state to resume
