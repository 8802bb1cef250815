"""Model shapes and parameter (de)serialisation."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from task.config import ConfigError
from task.models import build_model, count_parameters
from task.params import get_arrays, set_arrays

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet18"])
def test_output_shape(name: str, shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, num_classes=7).eval()
    assert list(inspect.signature(model.forward).parameters) == ["x"]
    with torch.no_grad():
        out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_parameter_counts() -> None:
    # 2NN on 8x8: 64*200+200 + 200*200+200 + 200*10+10
    assert count_parameters(build_model("mlp", (1, 8, 8), 10)) == 55_210
    # the FedAvg paper CNN on MNIST has 1,663,370 parameters
    assert count_parameters(build_model("cnn", (1, 28, 28), 10)) == 1_663_370


def test_resnet18_stem_is_adapted() -> None:
    model = build_model("resnet18", (1, 8, 8), 10)
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (3, 3)
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)


def test_unknown_model_lists_allowed_names() -> None:
    with pytest.raises(ConfigError, match=r"mlp, cnn, resnet18.*'vgg'"):
        build_model("vgg", (1, 8, 8), 10)


def test_arrays_roundtrip() -> None:
    torch.manual_seed(0)
    source = build_model("resnet18", (1, 8, 8), 10)
    torch.manual_seed(1)
    target = build_model("resnet18", (1, 8, 8), 10)
    arrays = get_arrays(source)
    assert list(arrays) == list(source.state_dict())
    assert arrays["bn1.num_batches_tracked"].dtype == np.int64
    arrays["fc.bias"][:] = 0.5  # a copy: changing it does not touch the model
    assert not torch.all(source.fc.bias == 0.5)
    set_arrays(target, arrays)
    for key, value in target.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), arrays[key])


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda a: a.pop("net.1.weight"), r"missing keys \['net.1.weight'\]"),
        (lambda a: a.update(extra=np.zeros(1)), r"unexpected keys \['extra'\]"),
        (
            lambda a: a.update({"net.5.bias": np.zeros(3, np.float32)}),
            r"'net.5.bias' has shape \(3,\), the model expects \(10,\)",
        ),
    ],
    ids=["missing", "extra", "shape"],
)
def test_set_arrays_is_strict(mutate, pattern: str) -> None:
    model = build_model("mlp", (1, 8, 8), 10)
    before = get_arrays(model)
    arrays = get_arrays(model)
    mutate(arrays)
    with pytest.raises(ValueError, match=pattern):
        set_arrays(model, arrays)
    for key, value in get_arrays(model).items():  # nothing was half-loaded
        np.testing.assert_array_equal(value, before[key])
