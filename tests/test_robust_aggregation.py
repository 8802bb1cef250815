"""Robust aggregation by default: the norm filter (k x the median of recent update norms, with a
warm-up for the very first replies) and the trimmed mean that trims at least one per side."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from fake_grid import delta_reply, deterministic_client, received, small_model
from flwr.app import Message
from recorder import Recorder
from test_parameter_server import fedavg_reference, make

from server.strategy.aggregator import StreamingAggregator
from server.strategy.config import StrategyConfig
from server.strategy.messaging import to_array_record
from server.strategy.norm_filter import NormFilter
from server.strategy.state import ServerState
from task.config import ConfigError

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def scaled_client(bad: int, factor: float = 1000.0):  # type: ignore[no-untyped-def]
    """The deterministic client, except partition ``bad`` sends its update times ``factor``."""

    def client(message: Message, partition: int):  # type: ignore[no-untyped-def]
        reply = deterministic_client(message, partition)
        if partition != bad:
            return reply
        params, version, _ = received(message)
        deltas = {k: v.numpy() for k, v in reply["arrays"].items()}
        deltas = {k: v * factor if v.dtype.kind == "f" else v for k, v in deltas.items()}
        return delta_reply(deltas, 10 + 3 * partition, version, partition)

    return client


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_x1000_client_among_the_very_first_replies_is_rejected_by_default(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Round 1, and the bad client's reply is the first the server gets: no median exists yet,
    so the first replies are held until three norms are known, then judged."""
    cfg = {"mode": mode, "buffer_size": 3, "concurrency": 5} if mode == "async" else {}
    server, grid = make(
        5,
        client_fn=scaled_client(bad=0),
        # the bad client replies first (once: twice before the others would be 2 of 3 norms)
        latency=lambda p, i, m: (0.5 if i == 0 else 3.0) if p == 0 else 1.0 + 0.1 * p,
        **cfg,
    )
    sink = Recorder()
    x0 = small_model()
    with caplog.at_level(logging.WARNING):
        server.start(grid, to_array_record(x0), num_rounds=1, sink=sink)
    first = sink.events[0]
    assert first.rejected_by_reason == {"norm_outlier": 1}
    assert "rejected reply from node 1001: norm_outlier" in caplog.text  # node id of partition 0
    if mode == "sync":
        assert first.num_accepted == 4
        expected = fedavg_reference(x0, [1, 2, 3, 4], 1)
        for key in x0:
            np.testing.assert_array_equal(server.state.global_arrays[key], expected[key])
    # the bad client moved nothing: the update is that of honest clients
    assert first.update_norm < 2 * max(_honest_norms(x0))


def _honest_norms(x0: dict[str, np.ndarray]) -> list[float]:
    from fake_grid import deterministic_delta

    norms = []
    for p in range(5):
        d = deterministic_delta(x0, p, 1)
        norms.append(
            float(
                np.sqrt(
                    sum(
                        np.sum(v.astype(np.float64) ** 2) for v in d.values() if v.dtype.kind == "f"
                    )
                )
            )
        )
    return norms


def test_the_bound_holds_for_any_scale_and_claimed_example_count() -> None:
    """The guarantee of the norm filter: the aggregate's norm is at most k x the largest honest
    norm, whatever one client sends (its update scaled by s, any num-examples claimed)."""
    rng = np.random.default_rng(0)
    model = {"w": np.zeros(50, np.float32)}
    k = 10.0
    for scale in (0.5, 3.0, 9.0, 20.0, 1e3, 1e6):
        for claimed in (1, 10, 10**9):
            agg = StreamingAggregator(model, norm_filter=NormFilter(k))
            honest = []
            for i in range(6):
                d = (rng.standard_normal(50) * (1 + 0.3 * i)).astype(np.float32)
                honest.append(float(np.linalg.norm(d.astype(np.float64))))
                agg.add(delta_reply({"w": d}, 20, 0, i), node_id=i)
                if i == 2:  # the bad one arrives in the middle of the first aggregate
                    bad = (rng.standard_normal(50) * scale).astype(np.float32)
                    agg.add(delta_reply({"w": bad}, claimed, 0, 99), node_id=99)
            agg.settle()
            norm = float(np.linalg.norm(agg.mean_delta()["w"]))
            assert norm <= k * max(honest) + 1e-9, (scale, claimed)


def test_warm_up_holds_at_most_two_and_settles_a_short_aggregate() -> None:
    model = {"w": np.zeros(3, np.float32)}
    agg = StreamingAggregator(model, norm_filter=NormFilter(10.0))
    assert agg.add(delta_reply({"w": np.ones(3, np.float32)}, 5, 0, 0), node_id=1)
    assert agg.add(delta_reply({"w": np.full(3, 2.0, np.float32)}, 5, 0, 1), node_id=2)
    assert agg.num_held == 2 and agg.num_accepted == 0
    agg.settle()  # a first round of two replies: nothing can be called an outlier
    assert agg.num_held == 0 and agg.num_accepted == 2
    # from now on the window judges at once
    assert not agg.add(delta_reply({"w": np.full(3, 500.0, np.float32)}, 5, 0, 2), node_id=3)
    assert agg.rejected == {"norm_outlier": 1}
    assert agg.add(delta_reply({"w": np.full(3, 1.5, np.float32)}, 5, 0, 3), node_id=4)
    assert agg.num_accepted == 3 and agg.num_held == 0


def test_a_zero_median_rejects_nothing() -> None:
    model = {"w": np.zeros(2, np.float32)}
    agg = StreamingAggregator(model, norm_filter=NormFilter(10.0))
    for i in range(3):
        agg.add(delta_reply({"w": np.zeros(2, np.float32)}, 5, 0, i), node_id=i)
    assert agg.add(delta_reply({"w": np.ones(2, np.float32)}, 5, 0, 3), node_id=3)
    assert agg.num_accepted == 4


def test_the_norm_window_is_part_of_the_state() -> None:
    state = ServerState(StrategyConfig(), seed=0)
    state.set_arrays({"w": np.zeros(2, np.float32)})
    assert state.norm_filter is not None
    for i, v in enumerate((1.0, 2.0, 3.0, 4.0)):
        state.aggregator.add(delta_reply({"w": np.full(2, v, np.float32)}, 5, 0, i), node_id=i)
    other = ServerState(StrategyConfig(), seed=0)
    other.load_state_dict(state.state_dict())
    assert other.norm_filter is not None
    assert list(other.norm_filter.norms) == list(state.norm_filter.norms)
    assert len(other.norm_filter.norms) == 4


@pytest.mark.parametrize("value", [1.0, 0.5, -3.0])
def test_max_norm_ratio_must_exceed_one(value: float) -> None:
    with pytest.raises(ConfigError, match="strategy.max_norm_ratio must be > 1"):
        StrategyConfig(max_norm_ratio=value).validate()
    StrategyConfig(max_norm_ratio=None).validate()
    assert ServerState(StrategyConfig(max_norm_ratio=None)).norm_filter is None


def test_trimmed_mean_trims_one_per_side_from_three_replies_and_logs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """trim_fraction=0.1 of 3 is 0: asked for a trimmed mean, one value per side is still
    dropped (the median of three), and the log says which node was trimmed most."""
    model = {"w": np.zeros(4, np.float32)}
    agg = StreamingAggregator(model, aggregation="trimmed_mean", trim_fraction=0.1)
    values = [[1.0, 2.0, 3.0, 4.0], [1.2, 2.2, 3.2, 4.2], [90.0, 90.0, 90.0, 90.0]]
    for i, v in enumerate(values):
        agg.add(delta_reply({"w": np.array(v, np.float32)}, 10, 0, i), node_id=100 + i)
    with caplog.at_level(logging.INFO):
        mean = agg.mean_delta()["w"]
    np.testing.assert_allclose(mean, np.array(values[1], np.float32).astype(np.float64))
    assert "trimmed mean of 3 replies: dropped the 1 lowest and 1 highest" in caplog.text
    assert "node 102 in 100%" in caplog.text
    assert [agg.trim_count(n) for n in (1, 2, 3, 9, 10, 20, 21)] == [0, 0, 1, 1, 1, 2, 2]


def test_trimmed_mean_of_two_replies_trims_nothing_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = {"w": np.zeros(2, np.float32)}
    agg = StreamingAggregator(model, aggregation="trimmed_mean", trim_fraction=0.4)
    for i, v in enumerate(([1.0, 2.0], [3.0, 4.0])):
        agg.add(delta_reply({"w": np.array(v, np.float32)}, 10, 0, i), node_id=i)
    with caplog.at_level(logging.INFO):
        np.testing.assert_allclose(agg.mean_delta()["w"], [2.0, 3.0])
    assert "fewer than 3, nothing trimmed" in caplog.text
