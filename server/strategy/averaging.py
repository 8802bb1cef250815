"""Publishing an average of the global versions instead of the last one (``strategy.ema_decay``).

Polyak-Ruppert averaging in its exponential form: with decay ``d`` and ``x_t`` the global
parameters after version ``t``,

    m_t = d · m_{t-1} + (1 - d) · x_t,   m_0 = 0,        x̂_t = m_t / (1 - d^t)

(the bias correction makes ``x̂_1 = x_1``). The server keeps training from ``x_t`` (clients are
sent the last version); evaluation, checkpoints' published model and the ONNX export use ``x̂_t``.
Asynchronous updates are noisy near the optimum (stale replies, buffers of a few label-skewed
clients): the average damps that noise at the cost of lagging ~``1/(1-d)`` versions behind.
Arrays that are not floating point (counters such as BatchNorm's ``num_batches_tracked``) are
published as they are in ``x_t``. Memory: one more copy of the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ParameterAverage:
    """The bias-corrected exponential moving average of the global versions."""

    def __init__(self, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"strategy.ema_decay must be in (0, 1) to average, got {decay}")
        self.decay = float(decay)
        self.sum: dict[str, np.ndarray] | None = None  # m_t
        self.steps = 0  # t

    def update(self, arrays: dict[str, np.ndarray]) -> None:
        """Fold in ``x_t`` (the server's new arrays; not modified)."""
        d = self.decay
        if self.sum is None:
            self.sum = {k: np.zeros_like(v) for k, v in arrays.items() if _averaged(v)}
        for key, acc in self.sum.items():
            acc *= d
            acc += (1 - d) * arrays[key]
        self.steps += 1

    def value(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``x̂_t`` (new arrays), ``arrays`` (= ``x_t``) for what is not averaged or before any
        update."""
        if self.sum is None or self.steps == 0:
            return arrays
        scale = 1.0 / (1.0 - self.decay**self.steps)
        return {
            key: (self.sum[key] * scale).astype(value.dtype) if key in self.sum else value
            for key, value in arrays.items()
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "steps": self.steps,
            "sum": None if self.sum is None else {k: v.copy() for k, v in self.sum.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        saved = state.get("sum")
        self.sum = None if saved is None else {k: np.array(v, copy=True) for k, v in saved.items()}


def _averaged(value: np.ndarray) -> bool:
    return np.issubdtype(value.dtype, np.floating)
