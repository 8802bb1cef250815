"""Fault injection (``faults.*``): seeded, disjoint assignment; what each fault does to a reply;
the client's deadline."""

from __future__ import annotations

import pytest
import torch

from client.deadline import Deadline
from client.faults import assignment, corrupt_update
from server.config import ExperimentConfig
from task.config import ConfigError, FaultsConfig
from task.training import DeadlinePassed


def test_off_by_default() -> None:
    cfg = ExperimentConfig.from_dict({})
    assert not cfg.faults.enabled()
    assert assignment(cfg.faults, 10, seed=0) == {}


def test_kinds_go_to_disjoint_seeded_sets_of_round_fraction_n() -> None:
    cfg = FaultsConfig(
        crash_fraction=0.3, straggle_fraction=0.2, nan_fraction=0.1, scale_fraction=0.1
    )
    faulty = assignment(cfg, 10, seed=4)
    kinds = sorted(faulty.values())
    assert kinds == ["crash"] * 3 + ["nan"] + ["scale"] + ["straggle"] * 2
    assert faulty == assignment(cfg, 10, seed=4)  # every client computes the same
    assert faulty != assignment(cfg, 10, seed=5)
    assert faulty != assignment(FaultsConfig(**{**vars(cfg), "seed": 1}), 10, seed=4)


def test_whole_run_or_per_round() -> None:
    whole = FaultsConfig(scale_fraction=0.2)
    assert {v: tuple(assignment(whole, 10, 0, v)) for v in range(5)} == {
        v: tuple(assignment(whole, 10, 0, 0)) for v in range(5)
    }
    per_round = FaultsConfig(scale_fraction=0.2, per_round=True)
    drawn = {tuple(sorted(assignment(per_round, 10, 0, v))) for v in range(8)}
    assert len(drawn) > 1


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"crash_fraction": 1.5}, "faults.crash_fraction must be in [0, 1]"),
        ({"crash_fraction": 0.6, "nan_fraction": 0.6}, "add up to 1.2 > 1"),
        ({"straggle_factor": 1.0}, "faults.straggle_factor must be > 1"),
    ],
)
def test_bad_values_are_one_line_errors(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ExperimentConfig.from_dict({"faults": values})


def test_corrupted_updates() -> None:
    delta = {"w": torch.ones(2, 3), "b": torch.ones(3), "n": torch.tensor(4)}
    scaled = corrupt_update("scale", delta, 1000.0)
    assert torch.equal(scaled["w"], torch.full((2, 3), 1000.0)) and torch.equal(
        scaled["n"], delta["n"]
    )
    nan = corrupt_update("nan", delta, 1000.0)
    assert torch.isnan(nan["w"]).all() and torch.equal(nan["b"], delta["b"])
    shape = corrupt_update("wrong_shape", delta, 1000.0)
    assert shape["w"].shape == (7,) and shape["b"].shape == (3,)
    assert torch.equal(delta["w"], torch.ones(2, 3))  # not modified


def test_deadline_sleep_stops_at_the_deadline() -> None:
    now = [100.0]
    slept: list[float] = []

    def pause(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    deadline = Deadline(110.0, clock=lambda: now[0], pause=pause)
    deadline.sleep(4.0)
    assert slept == [4.0]
    with pytest.raises(DeadlinePassed, match="24.0s past the deadline"):
        deadline.sleep(30.0)
    assert slept == [4.0, 6.0] and now[0] == 110.0  # slept until the deadline, not 30 s
    with pytest.raises(DeadlinePassed, match="expired 0.0s before training"):
        deadline.check("training")
