"""Local training and evaluation loops, device choice, seeded loaders.

``train`` minimises, by SGD with momentum and weight decay over ``local_epochs`` passes,

    L(w) = CE(f_w(x), y) + (mu / 2) * ||w - w_global||^2     (FedProx, Li et al. 2020, when mu > 0)

and returns the mean cross-entropy (without the proximal term, so losses compare across mu) over
all batches of all epochs. ``evaluate`` returns ``(sum_i CE_i / N, correct / N)``.

A training run may have a ``deadline`` (a ``time.time()`` stamp: in federated training, when the
server stops waiting for the reply); past it, work stops with :class:`DeadlinePassed` instead of
computing an update nobody will read.
"""

from __future__ import annotations

import logging
import math
import random
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from task.config import ConfigError, TrainConfig
from task.models import has_batch_norm

logger = logging.getLogger(__name__)


class DeadlinePassed(TimeoutError):
    """The work's deadline passed: its result would arrive too late to be used."""


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(int(seed) & 0xFFFFFFFF)
    torch.manual_seed(seed)


def get_device(preference: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else CPU. ``cuda`` without a GPU is a ConfigError."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cpu":
        return torch.device("cpu")
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={preference!r} but CUDA is not available here; use device=auto or cpu"
            )
        return torch.device(preference)
    raise ConfigError(f"device must be one of auto, cpu, cuda, got {preference!r}")


def make_loader(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    device: torch.device | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over in-memory tensors; the shuffle order depends only on ``seed``.

    Memory is pinned only for a CUDA ``device`` (it speeds host-to-device copies there and costs
    page-locked RAM for nothing on CPU).
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return DataLoader(
        TensorDataset(x, y),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        pin_memory=device is not None and torch.device(device).type == "cuda",
        drop_last=drop_last,
    )


def make_train_loader(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    seed: int,
    num_workers: int = 0,
    device: torch.device | None = None,
) -> DataLoader:
    """The shuffled loader :func:`train` takes for ``model``.

    With BatchNorm layers a last batch of one sample (``len(x) % batch_size == 1``) is dropped:
    their training-mode statistics need two samples, and one sample raises. Each epoch reshuffles,
    so a different sample sits out each epoch. Other models train on every sample.
    """
    lone_tail = len(x) > 1 and len(x) % batch_size == 1
    drop_last = lone_tail and has_batch_norm(model)
    return make_loader(
        x, y, batch_size, True, seed, num_workers=num_workers, device=device, drop_last=drop_last
    )


def train(
    model: nn.Module,
    loader: DataLoader,
    cfg: TrainConfig,
    device: torch.device,
    global_params: list[torch.Tensor] | None = None,
    deadline: float | None = None,
) -> float:
    """Train ``model`` in place for ``cfg.local_epochs``; returns the mean batch cross-entropy.

    With ``cfg.proximal_mu > 0`` the proximal anchor is ``global_params`` (one tensor per
    ``model.parameters()``, in order) or, when None, a copy of the parameters taken before the first
    step. A non-finite loss raises FloatingPointError instead of returning poisoned weights.
    Past ``deadline`` (a ``time.time()`` stamp, checked before each batch) it raises
    :class:`DeadlinePassed`.
    """
    if len(loader) == 0:
        raise ValueError("train() got an empty loader; the client has no training samples")
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    criterion = nn.CrossEntropyLoss()
    anchor: list[torch.Tensor] | None = None
    if cfg.proximal_mu > 0:
        source = global_params if global_params is not None else params
        if len(source) != len(params):
            raise ValueError(
                f"global_params has {len(source)} tensors, the model has {len(params)} parameters"
            )
        anchor = [g.detach().to(device, copy=True) for g in source]
    non_blocking = device.type == "cuda"
    total, batches = 0.0, 0
    for epoch in range(cfg.local_epochs):
        for xb, yb in loader:
            if deadline is not None and time.time() >= deadline:
                raise DeadlinePassed(
                    f"the deadline passed in epoch {epoch + 1} (batch {batches + 1}); "
                    "training stopped"
                )
            xb = xb.to(device, non_blocking=non_blocking)
            yb = yb.to(device, non_blocking=non_blocking)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(xb), yb)
            objective = loss
            if anchor is not None:
                prox = sum(((p - g) ** 2).sum() for p, g in zip(params, anchor, strict=True))
                objective = loss + 0.5 * cfg.proximal_mu * prox
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"training loss became {value} in epoch {epoch + 1} (batch {batches + 1}); "
                    f"lower train.lr (got {cfg.lr})"
                )
            objective.backward()
            optimizer.step()
            total += value
            batches += 1
    mean_loss = total / batches
    logger.debug(
        "trained %d epochs, %d batches, mean loss %.4f", cfg.local_epochs, batches, mean_loss
    )
    return mean_loss


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """``(sum of per-sample cross-entropy / N, accuracy)`` in eval mode without gradients."""
    model.to(device)
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for xb, yb in loader:
        xb, yb = xb.to(device), yb.to(device)
        logits = model(xb)
        loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(dim=1) == yb).sum())
        n += len(yb)
    if n == 0:
        raise ValueError("evaluate() got an empty loader; there is nothing to evaluate")
    return loss_sum / n, correct / n
