"""Atomic checkpoints: bit-exact round trip (arrays, optimizer state, RNG state), no torn files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_grid import received
from test_early_stop import _scripted_experiment

from server.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from server.strategy.config import StrategyConfig
from server.strategy.optimizers import ServerAdam
from server.strategy.sampling import PartitionSampler
from server.strategy.state import ServerState


def test_round_trip_is_bit_identical_including_rng(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.standard_normal((5, 3)).astype(np.float32),
        "d": rng.standard_normal(4),
        "n": np.array(9, np.int64),
        "nan": np.array([np.nan, -0.0, np.inf], np.float32),
    }
    opt = ServerAdam(0.1, 0.9, 0.99, 1e-3)
    opt.step({"w": arrays["w"]}, {"w": rng.standard_normal((5, 3))})
    sampler = PartitionSampler(5)
    sampler.set_nodes({p: 100 + p for p in range(10)})
    sampler.sample(3)
    state = {
        "arrays": arrays,
        "optimizer": opt.state_dict(),
        "version": 4,
        "round": 4,
        "sampler": sampler.state_dict(),
        "history": [{"version": 1, "train": {"train-loss": 0.5}}],
        "config": {"mode": "sync"},
    }
    path = save_checkpoint(tmp_path / "sub" / "state.pt", state)
    loaded = load_checkpoint(path)
    assert loaded is not None
    for key, value in arrays.items():
        assert loaded["arrays"][key].dtype == value.dtype
        assert loaded["arrays"][key].tobytes() == value.tobytes()
    for key, value in opt.state_dict()["buffers"]["v"].items():
        assert loaded["optimizer"]["buffers"]["v"][key].tobytes() == value.tobytes()
    assert loaded["history"] == state["history"] and loaded["version"] == 4
    restored = PartitionSampler(0)
    restored.set_nodes(sampler.node_of)
    restored.load_state_dict(loaded["sampler"])
    assert restored.sample(4) == sampler.sample(4)
    assert restored.pick([]) == sampler.pick([])
    # the export CLI's contract: plain torch.load with weights_only=False
    assert torch.load(path, weights_only=False)["version"] == 4
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]


def test_missing_checkpoint_is_none(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert load_checkpoint(tmp_path / "nope.pt") is None


def test_failed_save_leaves_the_old_checkpoint_and_no_temp_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "state.pt"
    save_checkpoint(path, {"version": 1})
    with pytest.raises(Exception):  # noqa: B017 - a lambda cannot be pickled
        save_checkpoint(path, {"version": 2, "bad": lambda: None})
    assert load_checkpoint(path) == {"version": 1}
    assert os.listdir(tmp_path) == ["state.pt"]


def test_server_state_dict_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = StrategyConfig(optimizer="yogi", server_lr=0.1)
    state = ServerState(cfg, seed=3)
    state.set_arrays({"w": np.ones(4, np.float32)})
    state.sampler.set_nodes({0: 1, 1: 2, 2: 3})
    state.sampler.sample(2)
    state.optimizer.step(state.global_arrays, {"w": np.full(4, 0.5)})
    state.version = state.round = 1
    path = save_checkpoint(tmp_path / "s.pt", state.state_dict())
    other = ServerState(cfg, seed=99)
    other.load_state_dict(load_checkpoint(path))  # type: ignore[arg-type]
    assert other.state_dict()["optimizer"]["step"] == 1 and other.version == 1 and other.seed == 3
    other.sampler.set_nodes(state.sampler.node_of)
    assert other.sampler.sample(2) == state.sampler.sample(2)
    with pytest.raises(ValueError, match="strategy.optimizer"):
        ServerState(StrategyConfig(optimizer="adam")).load_state_dict(state.state_dict())


def test_the_app_keys_of_a_checkpoint_are_ignored_and_another_format_is_refused(
    tmp_path: Path,
) -> None:
    """A checkpoint is ``{**state.state_dict(), "history": ..., "config": ...}``; the state loads
    from it as it is, and a checkpoint of another format fails with one line saying so."""
    state = ServerState(StrategyConfig(optimizer="adam"), seed=1)
    state.set_arrays({"w": np.ones(2, np.float32)})
    checkpoint = {**state.state_dict(), "history": {"rounds": []}, "config": {"seed": 1}}
    save_checkpoint(tmp_path / "c.pt", checkpoint)
    other = ServerState(StrategyConfig(optimizer="adam"), seed=1)
    other.load_state_dict(load_checkpoint(tmp_path / "c.pt"))  # type: ignore[arg-type]
    assert other.global_arrays["w"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="strategy.optimizer"):
        ServerState(StrategyConfig(optimizer="sgd")).load_state_dict(checkpoint)
    for old in ({**checkpoint, "format": 1}, {"arrays": {}, "version": 3}):
        with pytest.raises(ValueError, match="written by another fedserve version") as refused:
            ServerState(StrategyConfig(optimizer="adam")).load_state_dict(old)
        assert "\n" not in str(refused.value)


@pytest.mark.usefixtures("flower_task_identity")
def test_run_experiment_resumes_from_its_checkpoint_bit_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sink's checkpoint (state snapshot + the one history + config) resumes the run: same
    arrays as a straight run, the history continued, not duplicated."""
    strategy = {"name": "fedadam", "optimizer": "adam", "server_lr": 0.05}
    _scripted_experiment(tmp_path / "resumed", monkeypatch, rounds=2, strategy=strategy)
    grid, resumed = _scripted_experiment(
        tmp_path / "resumed", monkeypatch, rounds=4, strategy=strategy, resume=True
    )
    _, straight = _scripted_experiment(
        tmp_path / "straight", monkeypatch, rounds=4, strategy=strategy
    )
    assert [e.version for e in resumed.history.entries] == [1, 2, 3, 4]
    # versions 1-2 come from the first run's history (its scripted accuracies); the resumed run
    # evaluated no initial model and sent only versions 2 and 3
    assert [e.test_acc for e in resumed.history.entries] == [0.5, 0.8, 0.1, 0.5]
    assert {received(s.message)[1] for s in grid.log} == {2, 3}
    saved = load_checkpoint(tmp_path / "resumed" / CHECKPOINT_NAME)
    assert saved is not None and saved["version"] == 4
    assert [e["version"] for e in saved["history"]["rounds"]] == [1, 2, 3, 4]
    assert saved["config"]["rounds"] == 4
    for key, value in straight.final_arrays.items():
        assert resumed.final_arrays[key].tobytes() == value.tobytes(), key


@pytest.mark.usefixtures("flower_task_identity")
def test_run_experiment_refuses_a_checkpoint_of_another_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path / CHECKPOINT_NAME, {"format": 1, "version": 2, "history": []})
    with pytest.raises(ValueError, match="has state format 1, this fedserve writes 3"):
        _scripted_experiment(tmp_path, monkeypatch, rounds=4, strategy={}, resume=True)
