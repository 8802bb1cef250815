"""``stop_at_accuracy``: the run ends after the first version whose test accuracy reaches it.

Strategy level (ParameterServer on the scripted grid: the version sink returning True stops sync
and async runs, async drains what is in flight) and experiment level (``run_experiment`` with a
scripted central accuracy, for the ParameterServer in both modes and for Flower's FedAvg).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

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
from flwr.app import Message
from recorder import Recorder

import server.experiment as experiment
from server import version_sink
from server.central_evaluation import CentralEvaluator
from server.config import ExperimentConfig
from server.strategy.config import StrategyConfig
from server.strategy.events import VersionEvent
from server.strategy.messaging import to_array_record
from server.strategy.parameter_server import ParameterServer
from task.config import ConfigError

pytestmark = pytest.mark.usefixtures("flower_task_identity")

NODES = {1001: 0, 2002: 1, 3003: 2, 4004: 3}


def _server(**cfg) -> tuple[ParameterServer, FakeGrid]:  # type: ignore[no-untyped-def]
    clock = VirtualClock()
    grid = FakeGrid(dict(NODES), deterministic_client, clock=clock)
    server = ParameterServer(
        StrategyConfig(**cfg), seed=0, poll_interval=0.05, clock=clock, sleep=clock.sleep
    )
    return server, grid


def _stop_at(version: int) -> Recorder:
    def stop(event: VersionEvent) -> bool:
        return event.version >= version

    return Recorder(stop)


def test_sync_stops_after_the_version_the_sink_accepts() -> None:
    server, grid = _server()
    reference, _ = _server()
    sink = _stop_at(2)
    x0 = small_model()
    server.start(grid, to_array_record(x0), num_rounds=10, sink=sink)
    assert sink.versions == [1, 2]
    assert server.state.version == 2 and server.state.round == 2
    assert len(grid.log) == 2 * len(NODES)  # no third round was sent
    assert not grid.pending
    reference.start(
        FakeGrid(dict(NODES), deterministic_client, clock=reference.clock),  # type: ignore[arg-type]
        to_array_record(x0),
        num_rounds=2,
    )
    for key in x0:  # stopping early = the same parameters as a run of that many rounds
        np.testing.assert_array_equal(
            server.state.global_arrays[key], reference.state.global_arrays[key]
        )


def test_async_stops_and_drains_in_flight_replies() -> None:
    server, grid = _server(mode="async", buffer_size=2, concurrency=4, max_staleness=10)
    sink = _stop_at(3)
    x0 = to_array_record(small_model())
    server.start(grid, x0, num_rounds=50, sink=sink)
    assert sink.versions == [1, 2, 3]
    assert server.state.version == 3
    sent_versions = [received(s.message)[1] for s in grid.log]
    assert max(sent_versions) <= 2  # nobody was sent version 3: the run had ended
    assert not grid.pending  # every reply still in flight was pulled (and discarded)
    discarded = server.state.counters["discarded"]
    assert discarded == len(grid.log) - sum(e.num_accepted for e in sink.events)
    assert discarded > 0


def test_only_a_true_return_stops_the_run() -> None:
    server, grid = _server()
    # e.g. what a save function returns: not a stop request
    sink = Recorder(lambda event: Path("checkpoint.pt"))
    server.start(grid, to_array_record(small_model()), num_rounds=3, sink=sink)
    assert sink.versions == [1, 2, 3]


@pytest.mark.parametrize("value", [0.0, -0.5, 1.5])
def test_stop_at_accuracy_is_validated(value: float) -> None:
    with pytest.raises(ConfigError, match="stop_at_accuracy"):
        ExperimentConfig.from_dict({"stop_at_accuracy": value})
    assert ExperimentConfig.from_dict({"stop_at_accuracy": 1.0}).stop_at_accuracy == 1.0
    assert ExperimentConfig.from_dict({}).stop_at_accuracy is None


# ------------------------------------------------------------------ experiment level
ACCURACIES = [0.10, 0.50, 0.80, 0.95, 0.99, 0.99, 0.99, 0.99]  # version 0, 1, 2, ...


def weights_or_delta_client(message: Message, partition: int):  # type: ignore[no-untyped-def]
    """Replies a delta, or full weights when asked (Flower's FedAvg), like the ClientApp."""
    params = {k: v.numpy() for k, v in message.content["arrays"].items()}
    config = message.content["config"]
    server_round = int(config["server-round"])
    version = int(config.get("version", server_round - 1))
    delta = deterministic_delta(params, partition, server_round)
    if message.content["config"].get("reply") == "weights":
        delta = {k: (params[k] + delta[k]).astype(params[k].dtype) for k in params}
    return delta_reply(delta, 10 + 3 * partition, version, partition)


def _scripted_experiment(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    rounds: int,
    strategy: dict,
    stop_at_accuracy: float | None = None,
    resume: bool = False,
) -> tuple[FakeGrid, experiment.ExperimentResult]:
    """``run_experiment`` on the fake grid, central evaluation scripted to ``ACCURACIES``."""
    calls = iter(ACCURACIES)
    monkeypatch.setattr(CentralEvaluator, "__call__", lambda self, a: (1.0, next(calls)))
    cfg = ExperimentConfig.from_dict(
        {
            "rounds": rounds,
            "num_clients": len(NODES),
            "output_dir": str(tmp_path),
            "repository": None,
            "device": "cpu",
            "stop_at_accuracy": stop_at_accuracy,
            "resume": resume,
            "dataset": {"name": "synthetic", "num_samples": 200},
            "model": {"name": "mlp"},
            "strategy": {**strategy, "round_timeout_s": 30.0},
        }
    )
    grid = FakeGrid(dict(NODES), weights_or_delta_client, latency=lambda p, i, m: 0.0)
    return grid, experiment.run_experiment(grid, cfg)


@pytest.mark.parametrize(
    "strategy",
    [
        {"name": "fedavg"},
        {"name": "fedbuff", "mode": "async", "buffer_size": 2, "concurrency": 4},
        {"name": "flower_fedavg", "implementation": "flower_fedavg"},
    ],
    ids=["sync", "async", "flower_fedavg"],
)
def test_run_experiment_stops_at_accuracy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: dict
) -> None:
    grid, result = _scripted_experiment(
        tmp_path, monkeypatch, rounds=8, strategy=strategy, stop_at_accuracy=0.9
    )
    history = json.loads((tmp_path / "history.json").read_text())
    assert [e["version"] for e in history["rounds"]] == [1, 2, 3]
    assert [e["test_acc"] for e in history["rounds"]] == ACCURACIES[1:4]
    assert result.history.final_acc == 0.95
    assert not grid.pending


def test_history_png_is_redrawn_at_most_every_plot_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drawing the PNG costs the server loop ~0.2 s a version: first version and the end only."""
    import server.history

    drawn: list[int] = []
    monkeypatch.setattr(
        server.history, "plot_history", lambda runs, path: drawn.append(len(runs["run"].entries))
    )
    monkeypatch.setattr(version_sink, "PLOT_EVERY_S", 1e9)
    _scripted_experiment(tmp_path, monkeypatch, rounds=4, strategy={"name": "fedavg"})
    assert drawn == [1, 4]  # version 1, then only the final write
    history = json.loads((tmp_path / "history.json").read_text())
    assert [e["version"] for e in history["rounds"]] == [1, 2, 3, 4]  # json written every version


def test_version_seconds_start_once_the_federation_answered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Discovery (in simulation: every client actor loading the ClientApp) is start-up, not
    training: version 1's ``seconds`` count from its end, as every later version's do."""
    discover = ParameterServer.ensure_partitions

    def slow_discovery(
        self: ParameterServer, grid: object, timeout: float | None = None, config: object = None
    ) -> None:
        if not self.state.sampler.node_of:  # the query round trip, not the later no-op calls
            time.sleep(1.0)
        discover(self, grid, timeout, config)  # type: ignore[arg-type]

    monkeypatch.setattr(ParameterServer, "ensure_partitions", slow_discovery)
    _scripted_experiment(tmp_path, monkeypatch, rounds=2, strategy={"name": "fedavg"})
    seconds = [e["seconds"] for e in json.loads((tmp_path / "history.json").read_text())["rounds"]]
    assert len(seconds) == 2
    assert seconds[0] < 0.5, seconds
