"""``strategy.publish_in_background``: versions are announced (evaluated, checkpointed) on a worker
thread while the loop already sends the next model, in version order, with bounded memory, and
with the same training as inline announcing."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fake_grid import FakeGrid, received, small_model
from test_early_stop import ACCURACIES, _scripted_experiment
from test_parameter_server import make

from server.checkpoint import load_checkpoint, save_checkpoint
from server.strategy import VersionEvent
from server.strategy.announcer import VersionAnnouncer
from server.strategy.messaging import to_array_record

pytestmark = pytest.mark.usefixtures("flower_task_identity")

ASYNC = dict(mode="async", buffer_size=2, concurrency=4, max_staleness=10)


def _sent_versions(grid: FakeGrid) -> list[int]:
    return [received(s.message)[1] for s in list(grid.log)]


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_the_loop_sends_the_new_model_while_the_version_is_announced(background: bool) -> None:
    """on_version(1) waits for a client to be sent version 1: only in background can it be."""
    server, grid = make(4, publish_in_background=background, **ASYNC)
    seen: dict[str, object] = {}

    def on_version(event: VersionEvent) -> None:
        if event.version != 1:
            return
        deadline = time.monotonic() + (5.0 if background else 0.5)
        while time.monotonic() < deadline and max(_sent_versions(grid)) < 1:
            time.sleep(0.01)
        seen["sent_v1_meanwhile"] = max(_sent_versions(grid)) >= 1
        time.sleep(0.2)  # the loop runs on until the queue is full, then waits
        seen["made_meanwhile"] = server.version

    server.start(grid, to_array_record(small_model()), num_rounds=8, on_version=on_version)
    assert server.version == 8 and [h["version"] for h in server.history] == list(range(1, 9))
    assert seen["sent_v1_meanwhile"] is background
    # bounded: version 1 being announced, 2 queued, 3 made and waiting to be queued
    assert seen["made_meanwhile"] == (3 if background else 1)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_background_sync_run_equals_inline_and_resumes_bit_identically(
    tmp_path: Path, optimizer: str
) -> None:
    cfg = dict(optimizer=optimizer, server_lr=0.05, fraction_train=0.5, momentum=0.0)
    x0 = to_array_record(small_model())
    inline, grid = make(6, seed=7, **cfg)
    inline.start(grid, x0, num_rounds=5)

    first, grid1 = make(6, seed=7, publish_in_background=True, **cfg)
    path = tmp_path / "ckpt.pt"
    states: list[int] = []

    def checkpoint(event: VersionEvent) -> None:
        time.sleep(0.05)  # the loop is a round ahead by the time this version is saved
        state = event.state_dict()
        states.append(state["version"])
        save_checkpoint(path, state)

    first.start(grid1, x0, num_rounds=2, on_version=checkpoint)
    assert states == [1, 2]
    state = load_checkpoint(path)
    assert state is not None and [h["version"] for h in state["history"]] == [1, 2]
    second, grid2 = make(6, seed=123, node_offset=50_000, publish_in_background=True, **cfg)
    second.start(grid2, to_array_record({"junk": np.zeros(1)}), num_rounds=5, resume_state=state)
    assert second.version == 5 and [h["version"] for h in second.history] == [1, 2, 3, 4, 5]
    for key, value in inline.global_arrays.items():
        np.testing.assert_array_equal(second.global_arrays[key], value)
    assert [s.partition for s in grid1.log + grid2.log] == [s.partition for s in grid.log]
    assert [h["train"] for h in second.history] == [h["train"] for h in inline.history]


def test_snapshot_state_is_the_version_announced_not_the_live_server() -> None:
    server, grid = make(4, publish_in_background=True, **ASYNC)
    snapshots: list[tuple[int, int, dict[str, np.ndarray]]] = []

    def on_version(event: VersionEvent) -> None:
        time.sleep(0.02)
        state = event.state_dict()
        snapshots.append((event.version, state["version"], state["arrays"]))
        for key, value in event.arrays.items():
            np.testing.assert_array_equal(state["arrays"][key], value)

    server.start(grid, to_array_record(small_model()), num_rounds=6, on_version=on_version)
    assert [(v, s) for v, s, _ in snapshots] == [(v, v) for v in range(1, 7)]
    assert any(  # the server had moved on: the live state would have been another version
        not np.array_equal(snapshots[0][2][k], server.global_arrays[k]) for k in snapshots[0][2]
    )


def test_async_early_stop_in_background_keeps_every_made_version() -> None:
    server, grid = make(4, publish_in_background=True, **ASYNC)
    events: list[VersionEvent] = []

    def stop_at_3(event: VersionEvent) -> bool:
        time.sleep(0.05)
        events.append(event)
        return event.version >= 3

    server.start(grid, to_array_record(small_model()), num_rounds=50, on_version=stop_at_3)
    assert 3 <= server.version <= 5  # at most two versions made while 3 was announced
    assert [e.version for e in events] == list(range(1, server.version + 1))
    assert not grid.pending


def test_a_failing_announcement_stops_the_run_with_its_error() -> None:
    server, grid = make(4, publish_in_background=True, **ASYNC)
    announced: list[int] = []

    def on_version(event: VersionEvent) -> None:
        if event.version == 2:
            raise OSError("disk full")
        announced.append(event.version)

    with pytest.raises(RuntimeError, match="announcing a version failed") as failure:
        server.start(grid, to_array_record(small_model()), num_rounds=50, on_version=on_version)
    assert isinstance(failure.value.__cause__, OSError)
    assert announced == [1]  # nothing after the failed version is announced
    assert server.version < 50  # the loop stopped at its next submit


def test_announcer_keeps_order_and_bounds_the_queue() -> None:
    announcer = VersionAnnouncer(max_pending=1)
    release = threading.Event()
    done: list[int] = []

    def job(i: int):  # type: ignore[no-untyped-def]
        def run() -> None:
            if i == 0:
                release.wait(5)
            done.append(i)

        return run

    announcer.submit(job(0))  # running, blocked
    announcer.submit(job(1))  # queued
    blocked = threading.Thread(target=announcer.submit, args=(job(2),))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # the third waits for room
    release.set()
    blocked.join(5)
    announcer.close()
    assert done == [0, 1, 2]
    with pytest.raises(ValueError, match="max_pending"):
        VersionAnnouncer(max_pending=0)


def test_run_experiment_in_background_stops_at_accuracy_and_records_strategy_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    strategy = {"name": "fedbuff", "publish_in_background": True, **ASYNC}
    grid, result = _scripted_experiment(
        tmp_path, monkeypatch, rounds=8, strategy=strategy, stop_at_accuracy=0.9
    )
    rounds = json.loads((tmp_path / "history.json").read_text())["rounds"]
    versions = [e["version"] for e in rounds]
    assert versions[:3] == [1, 2, 3] and versions == list(range(1, len(versions) + 1))
    assert len(versions) <= 5 and [e["test_acc"] for e in rounds] == ACCURACIES[1 : 1 + len(rounds)]
    assert all(e["seconds"] >= 0 for e in rounds)
    checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint is not None and checkpoint["version"] == versions[-1]
    assert not grid.pending


def test_flower_fedavg_rejects_background_publishing() -> None:
    from task.config import ConfigError, ExperimentConfig

    with pytest.raises(ConfigError, match="publish_in_background"):
        ExperimentConfig.from_dict(
            {"strategy": {"implementation": "flower_fedavg", "publish_in_background": True}}
        )
    with pytest.raises(ConfigError, match="true or false"):
        ExperimentConfig.from_dict({"strategy": {"publish_in_background": "yes"}})
