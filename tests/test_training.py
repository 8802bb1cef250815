"""Training and evaluation loops, loaders and devices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from task.config import ConfigError, DatasetConfig, TrainConfig
from task.data import FederatedData, load_dataset
from task.models import build_model
from task.params import get_arrays
from task.training import evaluate, get_device, make_loader, set_seed, train

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> FederatedData:
    return load_dataset(DatasetConfig(name="digits"), seed=0)


def test_training_lowers_the_loss(digits: FederatedData) -> None:
    set_seed(0)
    model = build_model("cnn", digits.input_shape, digits.num_classes)
    train_loader = make_loader(digits.train_x, digits.train_y, 32, shuffle=True, seed=0)
    test_loader = make_loader(digits.test_x, digits.test_y, 256, shuffle=False, seed=0)
    loss_before, acc_before = evaluate(model, test_loader, CPU)
    cfg = TrainConfig(local_epochs=3, batch_size=32, lr=0.05, momentum=0.9)
    mean_train_loss = train(model, train_loader, cfg, CPU)
    loss_after, acc_after = evaluate(model, test_loader, CPU)
    assert loss_before > 2.0 and acc_before < 0.3
    assert loss_after < 0.3 * loss_before and acc_after > 0.9
    assert 0 < mean_train_loss < loss_before


def test_train_returns_the_mean_batch_loss(digits: FederatedData) -> None:
    """One full-batch step: the returned loss is the CE before the step, i.e. evaluate's loss."""
    set_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    x, y = digits.train_x[:200], digits.train_y[:200]
    expected, _ = evaluate(model, make_loader(x, y, 200, shuffle=False, seed=0), CPU)
    got = train(model, make_loader(x, y, 200, shuffle=True, seed=0), TrainConfig(lr=0.1), CPU)
    assert got == pytest.approx(expected, rel=1e-5)


def test_training_is_reproducible(digits: FederatedData) -> None:
    results = []
    for _ in range(2):
        set_seed(3)
        model = build_model("mlp", digits.input_shape, digits.num_classes)
        loader = make_loader(digits.train_x[:300], digits.train_y[:300], 16, shuffle=True, seed=4)
        train(model, loader, TrainConfig(local_epochs=1), CPU)
        results.append(get_arrays(model))
    for key, value in results[0].items():
        np.testing.assert_array_equal(value, results[1][key])


def _distance_from_start(digits: FederatedData, mu: float) -> float:
    set_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    start = [p.detach().clone() for p in model.parameters()]
    loader = make_loader(digits.train_x[:400], digits.train_y[:400], 32, shuffle=True, seed=0)
    train(model, loader, TrainConfig(local_epochs=2, lr=0.05, proximal_mu=mu), CPU, start)
    pairs = zip(model.parameters(), start, strict=True)
    return float(sum(((p.detach() - s) ** 2).sum() for p, s in pairs))


def test_fedprox_keeps_weights_near_the_global_ones(digits: FederatedData) -> None:
    free = _distance_from_start(digits, 0.0)
    anchored = _distance_from_start(digits, 5.0)
    assert anchored < 0.5 * free


def test_fedprox_anchor_defaults_to_the_initial_weights(digits: FederatedData) -> None:
    set_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    loader = make_loader(digits.train_x[:400], digits.train_y[:400], 32, shuffle=True, seed=0)
    train(model, loader, TrainConfig(local_epochs=2, lr=0.05, proximal_mu=5.0), CPU)
    explicit = _distance_from_start(digits, 5.0)
    set_seed(0)
    start = [p.detach() for p in build_model("mlp", digits.input_shape, 10).parameters()]
    implicit = float(
        sum(((p.detach() - s) ** 2).sum() for p, s in zip(model.parameters(), start, strict=True))
    )
    assert implicit == pytest.approx(explicit, rel=1e-5)


class _ZeroLogits(nn.Module):
    def __init__(self, classes: int) -> None:
        super().__init__()
        self.classes = classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), self.classes)


def test_evaluate_exact_numbers() -> None:
    """Zero logits: CE = ln K for every sample, argmax = class 0."""
    y = torch.tensor([0, 1, 2, 0, 3, 0, 1])
    loader = make_loader(torch.zeros(7, 1, 2, 2), y, batch_size=3, shuffle=False, seed=0)
    loss, acc = evaluate(_ZeroLogits(4), loader, CPU)
    assert loss == pytest.approx(math.log(4)) and acc == pytest.approx(3 / 7)


def test_empty_and_non_finite_inputs_raise() -> None:
    model = build_model("mlp", (1, 2, 2), 3)
    empty = make_loader(torch.zeros(0, 1, 2, 2), torch.zeros(0, dtype=torch.int64), 4, False, 0)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, empty, CPU)
    with pytest.raises(ValueError, match="empty"):
        train(model, empty, TrainConfig(), CPU)
    bad = make_loader(
        torch.full((4, 1, 2, 2), float("inf")), torch.zeros(4, dtype=torch.int64), 4, False, 0
    )
    with pytest.raises(FloatingPointError, match="lower train.lr"):
        train(model, bad, TrainConfig(), CPU)


def test_loader_is_seeded_and_pins_only_for_cuda() -> None:
    x, y = torch.arange(50.0).view(50, 1, 1, 1), torch.arange(50)
    order = lambda seed: torch.cat([b for _, b in make_loader(x, y, 8, True, seed)])  # noqa: E731
    assert torch.equal(order(1), order(1)) and not torch.equal(order(1), order(2))
    assert sorted(order(1).tolist()) == list(range(50))
    assert not make_loader(x, y, 8, True, 0, device=CPU).pin_memory
    assert make_loader(x, y, 8, True, 0, device=torch.device("cuda")).pin_memory


def test_get_device() -> None:
    assert get_device("cpu") == CPU
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert get_device("auto").type == expected
    with pytest.raises(ConfigError, match="must be one of auto, cpu, cuda"):
        get_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            get_device("cuda")
