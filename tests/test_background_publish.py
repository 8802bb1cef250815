"""``strategy.publish_in_background``: versions are handed to the sink (evaluated, checkpointed) on
a worker thread while the loop already sends the next model, in version order, with bounded memory,
and with the same training as inline."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fake_grid import FakeGrid, received, small_model
from recorder import Recorder
from test_early_stop import ACCURACIES, _scripted_experiment
from test_parameter_server import make

from server.checkpoint import load_checkpoint, save_checkpoint
from server.strategy.events import VersionEvent
from server.strategy.messaging import to_array_record
from server.strategy.sink import BackgroundRunner

pytestmark = pytest.mark.usefixtures("flower_task_identity")

ASYNC = dict(mode="async", buffer_size=2, concurrency=4, max_staleness=10)


def _sent_versions(grid: FakeGrid) -> list[int]:
    return [received(s.message)[1] for s in list(grid.log)]


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_the_loop_sends_the_new_model_while_the_sink_takes_the_version(background: bool) -> None:
    """The sink's accept(1) waits for a client to be sent version 1: only in background can it."""
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
        seen["made_meanwhile"] = server.state.version

    sink = Recorder(on_version)
    server.start(grid, to_array_record(small_model()), num_rounds=8, sink=sink)
    assert server.state.version == 8 and sink.versions == list(range(1, 9))
    assert seen["sent_v1_meanwhile"] is background
    # bounded: version 1 in the sink, 2 queued, 3 made and waiting to be queued
    assert seen["made_meanwhile"] == (3 if background else 1)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_background_sync_run_equals_inline_and_resumes_bit_identically(
    tmp_path: Path, optimizer: str
) -> None:
    cfg = dict(optimizer=optimizer, server_lr=0.05, fraction_train=0.5, momentum=0.0)
    x0 = to_array_record(small_model())
    inline, grid = make(6, seed=7, **cfg)
    whole = Recorder()
    inline.start(grid, x0, num_rounds=5, sink=whole)

    first, grid1 = make(6, seed=7, publish_in_background=True, **cfg)
    path = tmp_path / "ckpt.pt"
    states: list[int] = []

    def checkpoint(event: VersionEvent) -> None:
        time.sleep(0.05)  # the loop is a round ahead by the time this version is saved
        assert event.state is not None
        states.append(event.state["version"])
        save_checkpoint(path, event.state)

    before = Recorder(checkpoint)
    first.start(grid1, x0, num_rounds=2, sink=before)
    assert states == [1, 2]
    state = load_checkpoint(path)
    assert state is not None and state["version"] == 2
    second, grid2 = make(6, seed=123, node_offset=50_000, publish_in_background=True, **cfg)
    second.state.load_state_dict(state)
    after = Recorder()
    second.start(grid2, to_array_record({"junk": np.zeros(1)}), num_rounds=5, sink=after)
    assert second.state.version == 5 and before.versions + after.versions == [1, 2, 3, 4, 5]
    for key, value in inline.state.global_arrays.items():
        np.testing.assert_array_equal(second.state.global_arrays[key], value)
    assert [s.partition for s in grid1.log + grid2.log] == [s.partition for s in grid.log]
    train = [dict(e.train_metrics) for e in before.events + after.events]
    assert train == [dict(e.train_metrics) for e in whole.events]


def test_snapshot_state_is_the_version_handed_over_not_the_live_server() -> None:
    server, grid = make(4, publish_in_background=True, **ASYNC)
    snapshots: list[tuple[int, int, dict[str, np.ndarray]]] = []

    def on_version(event: VersionEvent) -> None:
        time.sleep(0.02)
        state = event.state
        assert state is not None
        snapshots.append((event.version, state["version"], state["arrays"]))
        for key, value in event.arrays.items():
            np.testing.assert_array_equal(state["arrays"][key], value)

    server.start(grid, to_array_record(small_model()), num_rounds=6, sink=Recorder(on_version))
    assert [(v, s) for v, s, _ in snapshots] == [(v, v) for v in range(1, 7)]
    live = server.state.global_arrays
    assert any(  # the server had moved on: the live state would have been another version
        not np.array_equal(snapshots[0][2][k], live[k]) for k in snapshots[0][2]
    )


def test_async_early_stop_in_background_keeps_every_made_version() -> None:
    server, grid = make(4, publish_in_background=True, **ASYNC)

    def stop_at_3(event: VersionEvent) -> bool:
        time.sleep(0.05)
        return event.version >= 3

    sink = Recorder(stop_at_3)
    server.start(grid, to_array_record(small_model()), num_rounds=50, sink=sink)
    assert 3 <= server.state.version <= 5  # at most two versions made while 3 was in the sink
    assert sink.versions == list(range(1, server.state.version + 1))
    assert not grid.pending


def test_a_failing_sink_stops_the_run_with_its_error() -> None:
    server, grid = make(4, publish_in_background=True, **ASYNC)
    accepted: list[int] = []

    def on_version(event: VersionEvent) -> None:
        if event.version == 2:
            raise OSError("disk full")
        accepted.append(event.version)

    with pytest.raises(RuntimeError, match="the version sink failed") as failure:
        server.start(grid, to_array_record(small_model()), num_rounds=50, sink=Recorder(on_version))
    assert isinstance(failure.value.__cause__, OSError)
    assert accepted == [1]  # nothing after the failed version is handed over
    assert server.state.version < 50  # the loop stopped at its next submit


def test_background_runner_keeps_order_bounds_the_queue_and_relays_a_stop() -> None:
    release = threading.Event()

    def hold_the_first(event: VersionEvent) -> bool:
        if event.version == 1:
            release.wait(5)
        return event.version == 2

    sink = Recorder(hold_the_first)
    runner = BackgroundRunner(sink, max_pending=1)
    events = [_event(v) for v in (1, 2, 3)]
    runner.submit(events[0])  # in the sink, blocked
    runner.submit(events[1])  # queued
    blocked = threading.Thread(target=runner.submit, args=(events[2],))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # the third waits for room
    assert not runner.stop_requested
    release.set()
    blocked.join(5)
    runner.close()
    assert sink.versions == [1, 2, 3]  # version 3 was made before the stop: still handed over
    assert runner.stop_requested and not sink.closed  # the sink's owner closes it
    with pytest.raises(ValueError, match="max_pending"):
        BackgroundRunner(sink, max_pending=0)


def _event(version: int) -> VersionEvent:
    from flwr.app import MetricRecord

    return VersionEvent(
        version=version,
        round=version,
        arrays={},
        train_metrics=MetricRecord(),
        client_eval_metrics=None,
        num_accepted=1,
        rejected_by_reason={},
        num_dropped=0,
        num_timed_out=0,
        update_norm=0.0,
        seconds=0.0,
        made_at=0.0,
        state=None,
    )


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
    from server.config import ExperimentConfig
    from task.config import ConfigError

    with pytest.raises(ConfigError, match="publish_in_background"):
        ExperimentConfig.from_dict(
            {"strategy": {"implementation": "flower_fedavg", "publish_in_background": True}}
        )
    with pytest.raises(ConfigError, match="true or false"):
        ExperimentConfig.from_dict({"strategy": {"publish_in_background": "yes"}})
