"""ParameterServer on a scripted fake grid: sync, validation, timeouts/retries, FedBuff, resume."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from fake_grid import (
    FakeGrid,
    VirtualClock,
    delta_reply,
    deterministic_client,
    deterministic_delta,
    received,
    small_model,
)
from flwr.app import Error, Message, MetricRecord
from flwr.serverapp.strategy import Strategy
from recorder import Recorder

from server.checkpoint import load_checkpoint, save_checkpoint
from server.strategy.config import StrategyConfig
from server.strategy.messaging import to_array_record
from server.strategy.parameter_server import ParameterServer
from server.strategy.sampling import PartitionSampler
from server.strategy.sync_loop import RoundFailedError

pytestmark = pytest.mark.usefixtures("flower_task_identity")

NODES = {1001: 0, 2002: 1, 3003: 2, 4004: 3, 5005: 4, 6006: 5, 7007: 6}


def make(
    num_partitions: int,
    client_fn=deterministic_client,  # type: ignore[no-untyped-def]
    latency=lambda p, i, m: 1.0,  # type: ignore[no-untyped-def]
    seed: int = 0,
    node_offset: int = 0,
    **cfg,  # type: ignore[no-untyped-def]
) -> tuple[ParameterServer, FakeGrid]:
    clock = VirtualClock()
    partition_of = {node + node_offset: p for node, p in NODES.items() if p < num_partitions}
    grid = FakeGrid(partition_of, client_fn, clock=clock, latency=latency)
    server = ParameterServer(
        StrategyConfig(**cfg), seed=seed, poll_interval=0.05, clock=clock, sleep=clock.sleep
    )
    return server, grid


def fedavg_reference(x, partitions, rounds, counts=lambda p: 10 + 3 * p):  # type: ignore[no-untyped-def]
    for r in range(1, rounds + 1):
        deltas = {p: deterministic_delta(x, p, r) for p in partitions}
        total = sum(counts(p) for p in partitions)
        new = {}
        for key, value in x.items():
            mean = sum(counts(p) * deltas[p][key].astype(np.float64) for p in partitions) / total
            if value.dtype.kind == "f":
                new[key] = (value.astype(np.float64) + mean).astype(value.dtype)
            else:
                new[key] = (value + np.rint(mean)).astype(value.dtype)
        x = new
    return x


def test_sync_fedavg_matches_hand_computation_and_contract() -> None:
    server, grid = make(4)
    sink = Recorder()
    x0 = small_model()
    result = server.start(
        grid,
        to_array_record(x0),
        num_rounds=3,
        train_config=_config(task='{"seed": 0}'),
        sink=sink,
    )
    events = sink.events
    expected = fedavg_reference(x0, range(4), 3)
    for key in x0:
        np.testing.assert_array_equal(server.state.global_arrays[key], expected[key])
        np.testing.assert_array_equal(result.arrays[key].numpy(), expected[key])
    assert [e.version for e in events] == [1, 2, 3] and [e.round for e in events] == [1, 2, 3]
    assert all(e.num_accepted == 4 and e.num_rejected == 0 for e in events)
    assert events[0].counts == {"accepted": 4, "rejected": 0, "dropped": 0, "timed_out": 0}
    assert events[0].train_metrics["train-loss"] == pytest.approx(
        sum((10 + 3 * p) * (1 + p) for p in range(4)) / sum(10 + 3 * p for p in range(4))
    )
    message = grid.log[-1].message
    config = message.content["config"]
    assert config["server-round"] == 3 and config["version"] == 2 and config["reply"] == "delta"
    assert config["task"] == '{"seed": 0}'
    assert message.metadata.message_type == "train"
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3]
    assert [e.state["version"] for e in events] == [1, 2, 3]  # type: ignore[index]
    assert not sink.closed  # the sink belongs to the caller, who closes it


def _config(**items):  # type: ignore[no-untyped-def]
    from flwr.app import ConfigRecord

    return ConfigRecord(items)


def bad_client(message: Message, partition: int):  # type: ignore[no-untyped-def]
    params, version, server_round = received(message)
    deltas = deterministic_delta(params, partition, server_round)
    n = 10 + 3 * partition
    if partition == 1:
        deltas["w"] = np.full_like(deltas["w"], np.nan)
    elif partition == 2:
        deltas["w"] = np.zeros((2, 2), np.float32)
    elif partition == 3:
        n = None  # type: ignore[assignment]
    elif partition == 4:
        deltas = {k: v * 10_000 if v.dtype.kind == "f" else v for k, v in deltas.items()}
    elif partition == 5:
        return Error(code=0, reason="client crashed")
    return delta_reply(deltas, n, version, partition)


def test_bad_replies_are_rejected_and_the_run_goes_on() -> None:
    server, grid = make(7, client_fn=bad_client, max_update_norm=100.0, min_replies=1)
    sink = Recorder()
    x0 = small_model()
    server.start(grid, to_array_record(x0), num_rounds=2, sink=sink)
    events = sink.events
    assert len(events) == 2
    for event in events:
        assert event.num_accepted == 2
        assert event.rejected_by_reason == {
            "non_finite": 1,
            "shape": 1,
            "num_examples": 1,
            "norm": 1,
            "error": 1,
        }
    expected = fedavg_reference(x0, [0, 6], 2)
    for key in x0:
        np.testing.assert_array_equal(server.state.global_arrays[key], expected[key])
    assert server.state.counters["rejected_non_finite"] == 2
    assert events[0].counts["rejected_shape"] == 1 and events[0].counts["rejected"] == 5


def test_sync_round_proceeds_after_timeout_with_min_replies() -> None:
    never = {3}
    server, grid = make(
        4,
        latency=lambda p, i, m: math.inf if p in never else 1.0 + p,
        round_timeout_s=5.0,
        min_replies=3,
    )
    sink = Recorder()
    server.start(grid, to_array_record(small_model()), num_rounds=2, sink=sink)
    # the fake grid answers the expired message as Flower does ("Message Unavailable"): that is
    # a timeout, not a rejected error
    assert [(e.num_accepted, e.num_timed_out) for e in sink.events] == [(3, 1), (3, 1)]
    assert all(e.num_rejected == 0 for e in sink.events)
    assert grid.clock.now == pytest.approx(10.0, abs=0.2)  # two rounds of 5 s timeouts
    assert server.state.counters["timed_out"] == 2 and "rejected_error" not in server.state.counters


def test_async_counts_an_expired_message_as_a_timeout() -> None:
    """Flower answers a message whose TTL (the reply deadline) ran out with an error reply; the
    async loop records it as timed out (and gives the slot away), not as a client error."""
    server, grid = make(
        3,
        latency=lambda p, i, m: 50.0 if p == 2 and i == 0 else 1.0,
        mode="async",
        buffer_size=2,
        concurrency=3,
        round_timeout_s=3.5,
    )
    sink = Recorder()
    server.start(grid, to_array_record(small_model()), num_rounds=6, sink=sink)
    assert sum(e.num_timed_out for e in sink.events) == 1
    assert all(e.num_rejected == 0 for e in sink.events)
    assert server.state.counters["timed_out"] == 1


def test_sync_retries_a_round_with_too_few_replies() -> None:
    server, grid = make(
        4,
        latency=lambda p, i, m: math.inf if p == 0 else 1.0,
        fraction_train=0.5,
        min_replies=2,
        round_timeout_s=5.0,
        max_round_retries=20,
        seed=3,
    )
    server.start(grid, to_array_record(small_model()), num_rounds=4)
    assert server.state.version == 4
    replay = PartitionSampler(3)
    replay.set_nodes({p: p for p in range(4)})
    failures = 0
    for _ in range(4):
        while 0 in replay.sample(2):
            failures += 1
    assert failures > 0
    assert server.state.counters["failed_rounds"] == failures
    assert len(grid.log) == 2 * (4 + failures)


def test_sync_gives_up_after_max_round_retries() -> None:
    server, grid = make(
        3, latency=lambda p, i, m: math.inf, round_timeout_s=2.0, max_round_retries=2
    )
    with pytest.raises(RoundFailedError, match="round 1 failed 3 time") as failed:
        server.start(grid, to_array_record(small_model()), num_rounds=2)
    assert "0 accepted, rejected {}, 3 timed out after 2s" in str(failed.value)
    assert "raise strategy.round_timeout_s" in str(failed.value)
    assert len(grid.log) == 3 * 3
    assert grid.clock.now == pytest.approx(6.0, abs=0.2)
    assert server.state.version == 0


def constant_client(message: Message, partition: int):  # type: ignore[no-untyped-def]
    params, version, _ = received(message)
    deltas = {
        k: np.full(v.shape, partition + 1, v.dtype) * (0.25 if v.dtype.kind == "f" else 1)
        for k, v in params.items()
    }
    return delta_reply(deltas, 10 * (partition + 1), version, partition)


def scripted(times: dict[int, list[float]]):  # type: ignore[no-untyped-def]
    return lambda p, i, m: times[p][i]


def test_async_staleness_weights_on_a_scripted_arrival_order() -> None:
    # t=1 p0(v0, tau 0); t=2 p1(v0, tau 0) -> v1; t=2.5 p0(v0, tau 1); t=10 p2(v0, tau 1) -> v2
    server, grid = make(
        3,
        client_fn=constant_client,
        latency=scripted({0: [1.0, 1.5, 20.0], 1: [2.0, 100.0], 2: [10.0]}),
        mode="async",
        buffer_size=2,
        concurrency=3,
        max_staleness=1,
        max_norm_ratio=None,  # a scripted schedule: no warm-up holding the first two replies
    )
    server.drain_timeout = 60.0
    sink = Recorder()
    x0 = {"w": np.zeros(3, np.float32)}
    server.start(grid, to_array_record(x0), num_rounds=2, sink=sink)
    events = sink.events
    c = {p: 0.25 * (p + 1) for p in range(3)}
    n = {p: 10 * (p + 1) for p in range(3)}
    s1 = 1 / math.sqrt(2)
    x1 = np.float32(0.0 + (n[0] * c[0] + n[1] * c[1]) / (n[0] + n[1]))
    x2 = np.float32(np.float64(x1) + (n[0] * s1 * c[0] + n[2] * s1 * c[2]) / (n[0] + n[2]))
    assert [e.version for e in events] == [1, 2]
    np.testing.assert_array_equal(events[0].arrays["w"], np.full(3, x1))
    np.testing.assert_array_equal(server.state.global_arrays["w"], np.full(3, x2))
    assert [e.num_accepted for e in events] == [2, 2]
    # the replying client was sent the newest model at once
    starts = [(s.partition, received(s.message)[1]) for s in grid.log]
    assert sorted(starts[:3]) == [(0, 0), (1, 0), (2, 0)]
    assert starts[3:] == [(0, 0), (1, 1), (0, 1)]
    # in flight at the end: p0 (due t=22.5) is drained and discarded, p1 (t=102) is left
    assert server.state.counters["discarded"] == 1 and len(grid.pending) == 1


def test_async_drops_replies_staler_than_max_staleness() -> None:
    server, grid = make(
        2,
        client_fn=constant_client,
        latency=scripted({0: [1.0, 3.0, 50.0], 1: [2.0, 100.0]}),
        mode="async",
        buffer_size=1,
        concurrency=2,
        max_staleness=0,
        round_timeout_s=30.0,
        max_norm_ratio=None,  # a scripted schedule: no warm-up holding the first two replies
    )
    sink = Recorder()
    server.start(grid, to_array_record({"w": np.zeros(2, np.float32)}), 2, sink=sink)
    assert [(e.version, e.num_dropped) for e in sink.events] == [(1, 0), (2, 1)]
    np.testing.assert_array_equal(server.state.global_arrays["w"], np.full(2, 0.5, np.float32))


def test_async_survives_bad_clients() -> None:
    server, grid = make(
        6,
        client_fn=bad_client,
        latency=lambda p, i, m: 1.0 + 0.1 * p,
        mode="async",
        buffer_size=2,
        concurrency=6,
        max_staleness=5,
        max_update_norm=100.0,
    )
    server.start(grid, to_array_record(small_model()), num_rounds=3)
    counters = server.state.counters
    assert server.state.version == 3
    assert counters["rejected_non_finite"] >= 1 and counters["rejected_error"] >= 1


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_resume_is_bit_identical(tmp_path, optimizer: str) -> None:  # type: ignore[no-untyped-def]
    cfg = dict(optimizer=optimizer, server_lr=0.05, momentum=0.0 if optimizer == "adam" else 0.9)
    cfg.update(fraction_train=0.5)
    x0 = to_array_record(small_model())
    full, grid = make(6, seed=7, **cfg)
    full.start(grid, x0, num_rounds=5)
    full_cohorts = [s.partition for s in grid.log]

    first, grid1 = make(6, seed=7, **cfg)
    path = tmp_path / "ckpt.pt"
    first.start(grid1, x0, num_rounds=2, sink=Recorder(lambda e: save_checkpoint(path, e.state)))
    state = load_checkpoint(path)
    assert state is not None and state["version"] == 2
    second, grid2 = make(6, seed=123, node_offset=50_000, **cfg)  # other node ids, other seed
    second.state.load_state_dict(state)
    resumed = Recorder()
    second.start(grid2, to_array_record({"junk": np.zeros(1)}), num_rounds=5, sink=resumed)
    assert second.state.version == 5 and resumed.versions == [3, 4, 5]
    for key, value in full.state.global_arrays.items():
        np.testing.assert_array_equal(second.state.global_arrays[key], value)
        assert second.state.global_arrays[key].dtype == value.dtype
    assert [s.partition for s in grid1.log + grid2.log] == full_cohorts


def test_evaluate_fn_is_called_for_version_zero_and_each_version() -> None:
    server, grid = make(3)
    calls: list[int] = []

    def evaluate_fn(version, arrays):  # type: ignore[no-untyped-def]
        calls.append(version)
        return MetricRecord({"acc": float(version)})

    sink = Recorder()
    result = server.start(
        grid, to_array_record(small_model()), 2, evaluate_fn=evaluate_fn, sink=sink
    )
    assert calls == [0, 1, 2] and sink.versions == [1, 2]
    assert {v: m["acc"] for v, m in result.evaluate_metrics_serverapp.items()} == {
        0: 0.0,
        1: 1.0,
        2: 2.0,
    }


def test_base_strategy_start_gives_the_same_run() -> None:
    """The batch configure/aggregate path equals the streaming sync loop."""
    x0 = to_array_record(small_model())
    streaming, grid = make(5, seed=2, fraction_train=0.6, optimizer="yogi", server_lr=0.1)
    streaming.start(grid, x0, num_rounds=3)
    batch, grid2 = make(5, seed=2, fraction_train=0.6, optimizer="yogi", server_lr=0.1)
    result = Strategy.start(batch, grid2, x0, num_rounds=3, timeout=100)
    for key, value in streaming.state.global_arrays.items():
        np.testing.assert_array_equal(result.arrays[key].numpy(), value)


def test_evaluate_replies_are_averaged_by_examples_and_errors_counted() -> None:
    """Federated evaluation (sync loop and the batch hooks share it): an error reply is counted,
    the others' metrics are averaged weighted by num-examples."""
    from collections import Counter

    from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

    from server.strategy.evaluation import average_evaluate_replies

    sent = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=7, message_type="evaluate")

    def ok(acc: float, n: int) -> Message:
        metrics = MetricRecord({"eval-acc": acc, "num-examples": n})
        return Message(RecordDict({"metrics": metrics}), reply_to=sent)

    counters: Counter[str] = Counter()
    bad = Message(Error(code=0, reason="client crashed"), reply_to=sent)
    averaged = average_evaluate_replies(counters, [ok(0.5, 10), bad, ok(1.0, 30)])
    assert counters["evaluate_error"] == 1
    assert averaged is not None
    assert averaged["eval-acc"] == pytest.approx(0.875)
    assert averaged["num-examples"] == 40
    assert average_evaluate_replies(counters, [bad]) is None
    assert counters["evaluate_error"] == 2


def test_balanced_pick_serves_the_least_served_idle_partition() -> None:
    sampler = PartitionSampler(4)
    sampler.set_nodes({p: 100 + p for p in range(5)})
    assert all(sampler.pick([0]) != 0 for _ in range(20))  # busy partitions are never picked
    most = max(sampler.picked.values())
    assert most - min(sampler.picked[p] for p in range(1, 5)) >= 2  # uniform: uneven
    assert sampler.pick([], balanced=True) == 0  # the one never sent a model comes first
    for _ in range(5 * most - 21):  # balanced picks level every partition up to the most-picked
        sampler.pick([], balanced=True)
    assert [sampler.picked[p] for p in range(5)] == [most] * 5
    restored = PartitionSampler(0)
    restored.set_nodes(sampler.node_of)
    restored.load_state_dict(sampler.state_dict())
    assert restored.picked == sampler.picked
    assert restored.pick([1], balanced=True) == sampler.pick([1], balanced=True)


@pytest.mark.parametrize("selection", ["uniform", "balanced"])
def test_async_selection_spreads_updates_over_fast_clients(selection: str) -> None:
    """Partition 0 takes 5x as long: uniform picking lets some fast clients pile up updates,
    balanced picking keeps the fast ones within one of each other and gives the slow one more."""
    server, grid = make(
        4,
        latency=lambda p, i, m: 5.0 if p == 0 else 1.0,
        mode="async",
        buffer_size=1,
        concurrency=2,
        max_staleness=20,
        selection=selection,
        max_norm_ratio=None,  # a scripted schedule: no warm-up holding the first two replies
    )
    server.start(grid, to_array_record(small_model()), num_rounds=30)
    sent = Counter(s.partition for s in grid.log)
    fast = [sent[p] for p in (1, 2, 3)]
    assert sent == server.state.sampler.picked
    if selection == "balanced":
        assert max(fast) - min(fast) <= 1 and sent[0] == 5
    else:  # the same seed, uniform: the spread balanced picking removes
        assert max(fast) - min(fast) >= 3 and sent[0] == 4
