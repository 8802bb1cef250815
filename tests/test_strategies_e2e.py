"""Strategies in real Flower runs: FedAvg parity with Flower's own; bit-identical resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from runs import fedserve_train, onnx_weights

from server.checkpoint import load_checkpoint

BASE = [
    "num_clients=4",
    "model=mlp",
    "partition=dirichlet",
    "partition.alpha=1.0",
    "train.local_epochs=1",
    "seed=11",
]


def test_our_fedavg_equals_flowers_fedavg_after_two_rounds(tmp_path: Path) -> None:
    ours = fedserve_train(
        tmp_path / "ours",
        *BASE,
        "rounds=2",
        "strategy=fedavg",
        f"repository={tmp_path / 'repo_ours'}",
    )
    flower = fedserve_train(
        tmp_path / "flower",
        *BASE,
        "rounds=2",
        "strategy=flower_fedavg",
        f"repository={tmp_path / 'repo_flower'}",
    )
    a = onnx_weights(tmp_path / "repo_ours" / "fedserve" / "2" / "model.onnx")
    b = onnx_weights(tmp_path / "repo_flower" / "fedserve" / "2" / "model.onnx")
    assert a.keys() == b.keys() and a
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= 1e-6, f"max |ours - flower| = {worst:.3g}"
    acc_ours = [r["test_acc"] for r in ours["rounds"]]
    acc_flower = [r["test_acc"] for r in flower["rounds"]]
    assert np.allclose(acc_ours, acc_flower, atol=1e-3)


def test_interrupted_then_resumed_run_is_bit_identical(tmp_path: Path) -> None:
    common = [*BASE, "strategy=fedadam", "repository=null"]
    fedserve_train(tmp_path / "resumed", *common, "rounds=2")
    resumed = fedserve_train(tmp_path / "resumed", *common, "rounds=3", "resume=true")
    straight = fedserve_train(tmp_path / "straight", *common, "rounds=3")

    assert [r["version"] for r in resumed["rounds"]] == [1, 2, 3]
    assert [r["test_acc"] for r in resumed["rounds"]] == [r["test_acc"] for r in straight["rounds"]]
    left = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    right = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    assert left is not None and right is not None
    assert left["version"] == right["version"] == 3
    for key, value in right["arrays"].items():
        assert torch.equal(torch.as_tensor(left["arrays"][key]), torch.as_tensor(value)), key
