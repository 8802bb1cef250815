"""Atomic checkpoints: bit-exact round trip (arrays, optimizer state, RNG state), no torn files."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from server.checkpoint import load_checkpoint, save_checkpoint
from server.strategy import ParameterServer
from server.strategy.optimizers import ServerAdam
from server.strategy.sampling import PartitionSampler
from task.config import StrategyConfig


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
    server = ParameterServer(cfg, seed=3)
    server.set_arrays({"w": np.ones(4, np.float32)})
    server.sampler.set_nodes({0: 1, 1: 2, 2: 3})
    server.sampler.sample(2)
    server.optimizer.step(server.arrays, {"w": np.full(4, 0.5)})  # type: ignore[arg-type]
    server.version = server.round = 1
    path = save_checkpoint(tmp_path / "s.pt", server.state_dict())
    other = ParameterServer(cfg, seed=99)
    other.load_state_dict(load_checkpoint(path))  # type: ignore[arg-type]
    assert other.state_dict()["optimizer"]["step"] == 1 and other.version == 1 and other.seed == 3
    other.sampler.set_nodes(server.sampler.node_of)
    assert other.sampler.sample(2) == server.sampler.sample(2)
    with pytest.raises(ValueError, match="strategy.optimizer"):
        ParameterServer(StrategyConfig(optimizer="adam")).load_state_dict(server.state_dict())


def test_server_state_survives_the_app_replacing_history_and_config(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The app saves ``{**server.state_dict(), "history": its own, "config": the whole cfg}``."""
    server = ParameterServer(StrategyConfig(optimizer="adam"), seed=1)
    server.set_arrays({"w": np.ones(2, np.float32)})
    state = {
        **server.state_dict(),
        "history": {"entries": [], "initial": {}},
        "config": {"seed": 1, "strategy": {"optimizer": "adam", "mode": "sync"}},
    }
    save_checkpoint(tmp_path / "c.pt", state)
    other = ParameterServer(StrategyConfig(optimizer="adam"), seed=1)
    other.load_state_dict(load_checkpoint(tmp_path / "c.pt"))  # type: ignore[arg-type]
    assert other.history == [] and other.global_arrays["w"].tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="strategy.optimizer"):
        ParameterServer(StrategyConfig(optimizer="sgd")).load_state_dict(state)
