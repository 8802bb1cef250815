"""Models by name. Every forward takes one argument ``x`` of shape (B, C, H, W) float32 and returns
logits of shape (B, num_classes); sizes come from the dataset's ``input_shape``.

- ``mlp``: flatten -> 200 -> 200 -> classes with ReLU (the FedAvg paper's "2NN").
- ``cnn``: the FedAvg paper's CNN: conv5x5-32 (pad 2), ReLU, maxpool 2, conv5x5-64 (pad 2), ReLU,
  maxpool 2, fc-512, ReLU, fc-classes. With padding 2 a conv keeps H x W, each pool floors it by 2,
  so the flattened size is ``64 * (H // 4) * (W // 4)`` (8x8 -> 256, 28x28 -> 3136, 32x32 -> 4096).
- ``resnet18``: torchvision's ResNet-18 (random init) for small images: conv1 is 3x3 stride 1 pad 1
  on ``C`` input channels and the stem max-pool is removed.
"""

from __future__ import annotations

import torch
from torch import nn

from task.config import MODELS, ConfigError


class MLP(nn.Module):
    """Two hidden layers of 200 units."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, 200),
            nn.ReLU(),
            nn.Linear(200, 200),
            nn.ReLU(),
            nn.Linear(200, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """The FedAvg paper CNN (McMahan et al. 2017, section 3), padded so 8x8 inputs work."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = input_shape
        if h < 4 or w < 4:
            raise ConfigError(f"model.name='cnn' needs images of at least 4x4, got {h}x{w}")
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * (h // 4) * (w // 4), 512),
            nn.ReLU(),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _resnet18(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """A freshly initialised model (seed torch first for reproducible weights)."""
    if name not in MODELS:
        raise ConfigError(f"model.name must be one of {', '.join(MODELS)}, got {name!r}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    c, h, w = shape
    if name == "mlp":
        return MLP((c, h, w), num_classes)
    if name == "cnn":
        return CNN((c, h, w), num_classes)
    return _resnet18((c, h, w), num_classes)


def has_batch_norm(model: nn.Module) -> bool:
    """True when ``model`` has BatchNorm layers (a training batch of one sample fails there)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
