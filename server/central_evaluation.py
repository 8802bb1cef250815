"""Central evaluation: global parameters scored on the held-out test set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from task.params import set_arrays
from task.training import evaluate, make_loader


@dataclass
class CentralEvaluator:
    """Evaluates global parameters on the held-out test set (one model, reused):
    ``evaluator(arrays) -> (test loss, test accuracy)``."""

    model: torch.nn.Module
    test_x: torch.Tensor
    test_y: torch.Tensor
    device: torch.device
    batch_size: int = 512

    def __call__(self, arrays: dict[str, np.ndarray]) -> tuple[float, float]:
        set_arrays(self.model, arrays)
        loader = make_loader(self.test_x, self.test_y, self.batch_size, shuffle=False, seed=0)
        return evaluate(self.model, loader, self.device)
