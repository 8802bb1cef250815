"""Emulated device speeds: who is slow, how long the device takes, and that train() waits for it."""

from __future__ import annotations

import time

import pytest
import torch

from client.heterogeneity import (
    WorkTimer,
    device_seconds,
    emulated,
    pad_to_device_time,
    slow_partitions,
    warm_up_once,
)
from server.config import ExperimentConfig
from task.config import ConfigError, HeterogeneityConfig


def test_slow_partitions_are_a_seeded_fixed_fraction() -> None:
    cfg = HeterogeneityConfig(slow_fraction=0.25, slow_factor=5.0)
    slow = slow_partitions(cfg, 20, seed=0)
    assert len(slow) == 5 and slow <= set(range(20))
    assert slow_partitions(cfg, 20, seed=0) == slow  # every process agrees
    assert slow_partitions(cfg, 20, seed=1) != slow
    assert slow_partitions(HeterogeneityConfig(), 20, seed=0) == set()


def test_device_seconds_multiply_work_by_both_factors() -> None:
    cfg = HeterogeneityConfig(slow_fraction=0.5, slow_factor=5.0, device_factor=10.0)
    assert device_seconds(cfg, slow=False, work_s=0.2) == pytest.approx(2.0)
    assert device_seconds(cfg, slow=True, work_s=0.2) == pytest.approx(10.0)
    assert device_seconds(HeterogeneityConfig(), slow=True, work_s=0.2) == pytest.approx(0.2)


def test_pad_sleeps_the_rest_of_the_device_time_measured_in_cpu_seconds() -> None:
    # scripted clocks (a loaded machine stretches wall time, not CPU time): 50 ms of CPU work
    # took 80 ms of wall time here
    wall, cpu = iter([10.0, 10.08, 10.08]), iter([3.0, 3.05])
    timer = WorkTimer(wall=lambda: next(wall), cpu=lambda: next(cpu))
    slept: list[float] = []
    total = pad_to_device_time(
        HeterogeneityConfig(slow_factor=4.0), True, timer, "cpu", slept.append
    )
    # the device takes 4 x 50 ms; the 80 ms of wall time are already spent
    assert slept == [total] and total == pytest.approx(4 * 0.05 - 0.08)


def test_the_work_timer_counts_this_threads_cpu_time() -> None:
    timer = WorkTimer()
    end = time.thread_time() + 0.02
    while time.thread_time() < end:  # 20 ms of CPU work
        pass
    assert timer.work_s("cpu") >= 0.02 and timer.elapsed_s() >= timer.work_s("cpu") - 1e-3


def test_time_spent_waiting_for_a_core_is_not_work() -> None:
    """A sleep (as when another simulated client holds the core) counts in wall time only."""
    timer = WorkTimer()
    time.sleep(0.05)
    assert timer.work_s("cpu") < 0.01 and timer.elapsed_s() >= 0.05
    assert timer.work_s("cuda") >= 0.05  # on a GPU the wall time is the work
    assert pad_to_device_time(HeterogeneityConfig(slow_factor=2.0), True, timer, "cpu") == 0.0


def test_fast_clients_at_this_machines_speed_never_sleep() -> None:
    timer = WorkTimer()
    torch.ones(100, 100) @ torch.ones(100, 100)
    assert pad_to_device_time(HeterogeneityConfig(), False, timer, "cpu", sleep=pytest.fail) == 0.0


@pytest.mark.parametrize(
    "key,value", [("device_factor", 0.5), ("slow_factor", 0.9), ("slow_fraction", 1.5)]
)
def test_bad_values_name_the_key(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"heterogeneity.{key}"):
        ExperimentConfig.from_dict({"heterogeneity": {key: value}})


@pytest.mark.usefixtures("flower_task_identity")
def test_train_waits_for_the_emulated_device_of_its_partition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    import client.app
    from task.models import build_model

    cfg = {
        "model": {"name": "mlp"},
        "train": {"local_epochs": 1, "batch_size": 16},
        "heterogeneity": {"slow_fraction": 0.5, "slow_factor": 3.0, "device_factor": 2.0},
    }
    slow = slow_partitions(ExperimentConfig.from_dict(cfg).heterogeneity, 4, seed=0)
    calls: list[tuple[bool, float]] = []

    def record(
        h: HeterogeneityConfig, is_slow: bool, timer: WorkTimer, device: str, sleep: object
    ) -> float:
        calls.append((is_slow, device_seconds(h, is_slow, timer.work_s(device))))
        return 0.0

    monkeypatch.setattr(client.app, "pad_to_device_time", record)
    model = build_model("mlp", (1, 8, 8), 10)
    for partition in range(4):
        config = ConfigRecord({"task": json.dumps(cfg), "server-round": 1, "version": 0})
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
        context = Context(
            run_id=1,
            node_id=11,
            node_config={"partition-id": partition, "num-partitions": 4},
            state=RecordDict(),
            run_config={},
        )
        client.app.train(Message(content=content, dst_node_id=11, message_type="train"), context)
    assert [is_slow for is_slow, _ in calls] == [p in slow for p in range(4)]
    assert all(seconds > 0 for _, seconds in calls)


def test_emulated_only_when_a_knob_is_not_neutral() -> None:
    def h(**kw: float) -> HeterogeneityConfig:
        return ExperimentConfig.from_dict({"heterogeneity": kw}).heterogeneity

    assert not emulated(h())
    assert not emulated(h(slow_fraction=0.25))  # slow by a factor of 1: nobody sleeps
    assert not emulated(h(slow_factor=5.0))  # no slow clients
    assert emulated(h(slow_fraction=0.25, slow_factor=5.0))
    assert emulated(h(device_factor=10.0))


def test_warm_up_runs_once_per_model_and_leaves_the_model_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from client import heterogeneity
    from task.models import build_model

    monkeypatch.setattr(heterogeneity, "_warmed", set())
    model = build_model("mlp", (1, 8, 8), 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    assert warm_up_once(model, x, y)
    assert not warm_up_once(model, x, y)  # once per process
    assert not warm_up_once(build_model("mlp", (1, 8, 8), 10), x, y)  # per model class
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    monkeypatch.setattr(heterogeneity, "_warmed", set())
    assert not warm_up_once(model, x[:1], y[:1])  # one example: batch norm could not train


@pytest.mark.usefixtures("flower_task_identity")
def test_device_work_starts_after_the_warm_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's one-off set-up (the warm-up) must not be counted as the device's work."""
    import json

    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

    import client.app
    from task.models import build_model

    events: list[str] = []
    monkeypatch.setattr(client.app, "warm_up_once", lambda *a: events.append("warm-up"))

    class Timer(WorkTimer):
        def __init__(self) -> None:
            events.append("timer")
            super().__init__()

    monkeypatch.setattr(client.app, "WorkTimer", Timer)
    monkeypatch.setattr(client.app, "pad_to_device_time", lambda *a: 0.0)
    model = build_model("mlp", (1, 8, 8), 10)
    for factor in (10.0, 1.0):
        cfg = {"model": {"name": "mlp"}, "heterogeneity": {"device_factor": factor}}
        config = ConfigRecord({"task": json.dumps(cfg), "server-round": 1, "version": 0})
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config})
        context = Context(
            run_id=1,
            node_id=11,
            node_config={"partition-id": 0, "num-partitions": 2},
            state=RecordDict(),
            run_config={},
        )
        client.app.train(Message(content=content, dst_node_id=11, message_type="train"), context)
    assert events == ["warm-up", "timer", "timer"]  # no warm-up without emulation
