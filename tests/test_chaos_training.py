"""The chaos benchmark's training rows, fast: the real ClientApp, faults injected by ``faults.*``.

The fast versions run ``run_experiment`` in-process on the scripted grid, whose clients are the
real ClientApp's ``train`` (real data, model, training, fault injection and error replies); a
straggler is a client the grid never answers for. One test runs the real Flower simulation
engine (the straggler's actor). The benchmark's own rows, with real ``fedserve-train`` runs, run
under ``-m slow``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from fake_grid import FakeGrid
from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from runs import fedserve_train

import client.app
import server.experiment as experiment
from client.faults import assignment
from server.config import ExperimentConfig

N = 10
ROUNDS = 5


def _client(message: Message, partition: int) -> RecordDict | Error:
    context = Context(
        run_id=1,
        node_id=1000 + partition,
        node_config={"partition-id": partition, "num-partitions": N},
        state=RecordDict(),
        run_config={},
    )
    reply = client.app.train(message, context)
    return reply.error if reply.has_error() else reply.content


def run(
    tmp: Path,
    *,
    faults: dict | None = None,
    strategy: dict | None = None,
    rounds: int = ROUNDS,
    round_timeout_s: float = 120.0,
) -> tuple[experiment.ExperimentResult, list[dict]]:
    """``run_experiment`` on the scripted grid with the real clients (mlp on digits, 10 clients);
    returns the result and the history's entries."""
    cfg = ExperimentConfig.from_dict(
        {
            "rounds": rounds,
            "num_clients": N,
            "output_dir": str(tmp),
            "repository": None,
            "device": "cpu",
            "model": {"name": "mlp"},
            "train": {"local_epochs": 5, "batch_size": 16},
            "faults": faults or {},
            "strategy": {"round_timeout_s": round_timeout_s, **(strategy or {})},
        }
    )
    faulty = assignment(cfg.faults, N, cfg.seed)
    grid = FakeGrid(
        {1000 + p: p for p in range(N)},
        _client,
        # the grid's clock stands still: the server waits in real time, the clients answer at
        # once, a straggler never
        latency=lambda p, i, m: math.inf if faulty.get(p) == "straggle" else 0.0,
    )
    result = experiment.run_experiment(grid, cfg)
    return result, json.loads((tmp / "history.json").read_text())["rounds"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> tuple[experiment.ExperimentResult, list]:
    with _task_identity():
        return run(tmp_path_factory.mktemp("clean"))


@pytest.fixture(scope="module")
def without_one(tmp_path_factory: pytest.TempPathFactory) -> experiment.ExperimentResult:
    """The run where the faulty partition of a 0.1 fraction is simply absent (it crashes)."""
    with _task_identity():
        return run(tmp_path_factory.mktemp("absent"), faults={"crash_fraction": 0.1})[0]


class _task_identity:
    """Flower stamps run/node ids on every Message; set them outside a runtime (module scope)."""

    def __enter__(self) -> None:
        self.saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 11, 1

    def __exit__(self, *exc: object) -> None:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = self.saved


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize(
    ("kind", "reason"),
    [("scale", "norm_outlier"), ("nan", "non_finite"), ("wrong_shape", "shape")],
)
def test_one_bad_client_under_the_default_strategy_costs_only_its_own_update(
    tmp_path: Path, clean: tuple, without_one: experiment.ExperimentResult, kind: str, reason: str
) -> None:
    """A x1000 / NaN / wrong-shape client is rejected every round, first replies included: the
    run is the run without that client, within 1 point of the clean run, never near chance."""
    result, entries = run(tmp_path, faults={f"{kind}_fraction": 0.1})
    assert [e["counts"].get(f"rejected_{reason}") for e in entries] == [1] * ROUNDS
    assert all(e["counts"]["accepted"] == N - 1 for e in entries)
    for key, value in without_one.final_arrays.items():
        np.testing.assert_allclose(result.final_arrays[key], value, rtol=0, atol=1e-6)
    clean_acc = clean[0].history.final_acc
    assert abs(result.history.final_acc - clean_acc) <= 0.01, (result.history.final_acc, clean_acc)
    assert min(e["test_acc"] for e in entries) > 0.8  # chance is 0.1


@pytest.mark.usefixtures("flower_task_identity")
def test_thirty_percent_crashing_clients_the_run_completes(tmp_path: Path, clean: tuple) -> None:
    result, entries = run(tmp_path, faults={"crash_fraction": 0.3})
    assert [e["counts"].get("rejected_error") for e in entries] == [3] * ROUNDS
    assert result.history.final_acc > clean[0].history.final_acc - 0.05


@pytest.mark.usefixtures("flower_task_identity")
def test_thirty_percent_straggling_clients_are_timeouts_and_the_run_completes(
    tmp_path: Path,
) -> None:
    result, entries = run(
        tmp_path, faults={"straggle_fraction": 0.3}, rounds=2, round_timeout_s=5.0
    )
    assert [(e["counts"]["timed_out"], e["counts"]["rejected"]) for e in entries] == [(3, 0)] * 2
    assert result.history.final_acc > 0.8


@pytest.mark.usefixtures("flower_task_identity")
@pytest.mark.parametrize(
    "strategy",
    [
        {"name": "fedbuff", "mode": "async", "buffer_size": 3, "concurrency": 5},
        {"name": "fedadam", "optimizer": "adam", "server_lr": 0.03},
        {"name": "flower_fedavg", "implementation": "flower_fedavg"},
    ],
    ids=["fedbuff", "fedadam", "flower_fedavg"],
)
def test_every_strategy_rejects_a_x1000_client_by_default(tmp_path: Path, strategy: dict) -> None:
    result, entries = run(tmp_path, faults={"scale_fraction": 0.1}, strategy=strategy, rounds=3)
    assert sum(e["counts"].get("rejected_norm_outlier", 0) for e in entries) >= 1
    assert min(e["test_acc"] for e in entries) > 0.5


def test_stragglers_do_not_starve_the_next_rounds_of_the_simulation(
    tmp_path: Path, process_marker: str
) -> None:
    """The real simulation engine, one Ray actor per core: a straggler's actor and the messages
    of a timed-out round must not block the next round's cohort (it did: 3/10 accepted, then
    0/10 and RoundFailedError). Every round gets the clients that are not straggling, or as many
    as the actors left free could serve."""
    history = fedserve_train(
        tmp_path / "run",
        "num_clients=10",
        "model=mlp",
        "rounds=3",
        "repository=null",
        "faults.straggle_fraction=0.3",
        "strategy.round_timeout_s=6",
        timeout=600,
    )
    counts = [entry["counts"] for entry in history["rounds"]]
    assert len(counts) == 3
    assert all(c["accepted"] >= 1 and c["timed_out"] >= 3 and c["rejected"] == 0 for c in counts)
    # the rounds after the first are not worse off than the first
    assert min(c["accepted"] for c in counts[1:]) >= counts[0]["accepted"]


@pytest.mark.slow
def test_the_benchmarks_training_rows_in_their_quick_setup(tmp_path: Path) -> None:
    """The rows of benchmarks/chaos/training.py with real fedserve-train runs (mlp, few rounds):
    signals (processes left, resume bit-identical) and faulty clients."""
    from benchmarks.chaos import training

    setup = training.setup(quick=True, runs=tmp_path)
    signals, faults = training.signal_rows(setup), training.fault_rows(setup)
    assert len(signals) + len(faults) == 8
    for row in signals:  # the stop time is the benchmark's figure; a test never times anything
        details = row.details
        assert details["left"] == 0 and details["identical"], row.figure
        assert details["resume_returncode"] == 0, row.figure
    assert [(r.fault, r.figure) for r in faults if not r.ok] == []
