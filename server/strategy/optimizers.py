"""Server optimizers: turn the aggregated client delta into the next global model.

Every optimizer sees the *pseudo-gradient* of one round (Reddi et al. 2021, "Adaptive Federated
Optimization", Algorithms 1-2)::

    Δ_t = weighted_mean_i(delta_i)          (float64, from the StreamingAggregator)
    g_t = -Δ_t

and produces an update ``u_t`` (float64) that is applied as ``x_{t+1} = x_t - u_t``; the result is
cast back to each array's own dtype. Floating arrays go through the optimizer; integer arrays
(e.g. BatchNorm's ``num_batches_tracked``) take the plain mean delta, rounded:
``x_{t+1} = x_t + rint(Δ_t)``; other dtypes (bool) are left unchanged.

Optional server-side clipping: when ``clip_update_norm`` is set and
``‖u_t‖₂ > c`` (one L2 norm over all floating arrays together), ``u_t ← u_t · c / ‖u_t‖₂``.
Clipping scales the applied update only; optimizer state is updated from the unclipped ``g_t``.

All state is float64 numpy arrays plus a step counter, returned by :meth:`state_dict` and restored
bit-exactly by :meth:`load_state_dict`.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from server.strategy.config import StrategyConfig
from server.strategy.validation import sum_of_squares

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


def is_float_array(array: np.ndarray) -> bool:
    """True for arrays the optimizer updates (any floating dtype)."""
    return bool(np.issubdtype(array.dtype, np.floating))


class ServerOptimizer(ABC):
    """Base class: pseudo-gradient in, new global arrays out; subclasses define ``u_t``."""

    name: str = "base"
    state_keys: tuple[str, ...] = ()

    def __init__(self, lr: float, clip_update_norm: float | None = None) -> None:
        if not lr > 0:
            raise ValueError(f"server optimizer lr must be > 0, got {lr}")
        if clip_update_norm is not None and not clip_update_norm > 0:
            raise ValueError(f"clip_update_norm must be > 0 or None, got {clip_update_norm}")
        self.lr = float(lr)
        self.clip_update_norm = clip_update_norm
        self.step_count = 0
        self.buffers: dict[str, Arrays] = {key: {} for key in self.state_keys}
        self.last_update_norm = 0.0
        self.last_clipped = False

    @abstractmethod
    def _update(self, grads: Arrays) -> Arrays:
        """Update the state from ``g_t`` and return ``u_t`` (float64, same keys)."""

    def hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.lr, "clip_update_norm": self.clip_update_norm}

    def step(self, params: Arrays, mean_delta: Arrays) -> Arrays:
        """Return ``x_{t+1}`` for the global arrays ``params`` and the weighted mean delta ``Δ_t``.

        ``params`` is not modified; the returned arrays have the dtypes of ``params``.
        """
        if set(params) != set(mean_delta):
            raise ValueError(
                f"mean delta keys differ from the global arrays: "
                f"missing {sorted(set(params) - set(mean_delta))}, "
                f"extra {sorted(set(mean_delta) - set(params))}"
            )
        self.step_count += 1
        grads = {
            key: -np.asarray(mean_delta[key], dtype=np.float64)
            for key, value in params.items()
            if is_float_array(value)
        }
        for key, grad in grads.items():
            for buffers in self.buffers.values():
                if key not in buffers:
                    buffers[key] = np.zeros_like(grad)
        update = self._update(grads)
        # not np.vdot: BLAS threads woken here spin on both cores through the central
        # evaluation that follows (it took twice as long as Flower's FedAvg's, benchmarks/scale)
        norm = math.sqrt(sum(sum_of_squares(u) for u in update.values()))
        self.last_update_norm = norm
        self.last_clipped = False
        if self.clip_update_norm is not None and norm > self.clip_update_norm:
            scale = self.clip_update_norm / norm
            update = {key: u * scale for key, u in update.items()}
            self.last_clipped = True
            log.info("server update norm %.4g clipped to %.4g", norm, self.clip_update_norm)
        new_params: Arrays = {}
        for key, x in params.items():
            if key in update:
                new = (x.astype(np.float64) - update[key]).astype(x.dtype)
            elif np.issubdtype(x.dtype, np.integer):
                rounded = np.rint(np.asarray(mean_delta[key], dtype=np.float64))
                new = (x.astype(np.float64) + rounded).astype(x.dtype)
            else:
                new = x.copy()
            new_params[key] = np.asarray(new)  # 0-d arithmetic yields numpy scalars
        return new_params

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically (arrays are copies)."""
        return {
            "name": self.name,
            "step": self.step_count,
            "hyperparameters": self.hyperparameters(),
            "buffers": {
                name: {key: value.copy() for key, value in buffers.items()}
                for name, buffers in self.buffers.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(
                f"optimizer state is for {state.get('name')!r}, this optimizer is {self.name!r}; "
                "resume with the same strategy.optimizer"
            )
        buffers = state["buffers"]
        if set(buffers) != set(self.state_keys):
            raise ValueError(
                f"optimizer state buffers {sorted(buffers)} != expected {list(self.state_keys)}"
            )
        self.step_count = int(state["step"])
        self.buffers = {
            name: {key: np.array(value, dtype=np.float64, copy=True) for key, value in b.items()}
            for name, b in buffers.items()
        }


class ServerSGD(ServerOptimizer):
    """SGD with optional (Nesterov) momentum, as ``torch.optim.SGD`` (dampening 0).

    ``v_t = μ v_{t-1} + g_t``;  ``u_t = η (g_t + μ v_t)`` (Nesterov) or ``u_t = η v_t``.
    ``μ = 0``: ``u_t = η g_t``, so ``η = 1`` gives ``x_{t+1} = x_t + Δ_t`` = FedAvg exactly;
    ``μ > 0`` without Nesterov is FedAvgM (Hsu et al. 2019), as flwr's ``FedAvgM``.
    """

    name = "sgd"

    def __init__(
        self,
        lr: float = 1.0,
        momentum: float = 0.0,
        nesterov: bool = False,
        clip_update_norm: float | None = None,
    ) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0, got momentum=0")
        self.state_keys = ("momentum",) if momentum > 0 else ()
        super().__init__(lr, clip_update_norm)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "momentum": self.momentum, "nesterov": self.nesterov}

    def _update(self, grads: Arrays) -> Arrays:
        if self.momentum == 0:
            return {key: self.lr * g for key, g in grads.items()}
        velocity = self.buffers["momentum"]
        update: Arrays = {}
        for key, g in grads.items():
            v = self.momentum * velocity[key] + g
            velocity[key] = v
            direction = g + self.momentum * v if self.nesterov else v
            update[key] = self.lr * direction
        return update


class _AdaptiveOptimizer(ServerOptimizer):
    """Shared first moment ``m_t = β₁ m_{t-1} + (1-β₁) g_t`` and ``u_t = η_t m_t / (√v_t + τ)``.

    τ is added *outside* the square root, as in Reddi et al. and flwr's FedOpt.
    """

    state_keys = ("m", "v")

    def __init__(
        self,
        lr: float,
        beta1: float,
        beta2: float,
        tau: float,
        clip_update_norm: float | None = None,
    ) -> None:
        super().__init__(lr, clip_update_norm)
        for key, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0 <= value < 1:
                raise ValueError(f"{key} must be in [0, 1), got {value}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.beta1 = float(beta1)
        self.beta2 = float(beta2)
        self.tau = float(tau)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            **super().hyperparameters(),
            "beta1": self.beta1,
            "beta2": self.beta2,
            "tau": self.tau,
        }

    @abstractmethod
    def _second_moment(self, v: np.ndarray, g: np.ndarray) -> np.ndarray: ...

    def _effective_lr(self) -> float:
        return self.lr

    def _update(self, grads: Arrays) -> Arrays:
        m_buf, v_buf = self.buffers["m"], self.buffers["v"]
        lr_t = self._effective_lr()
        update: Arrays = {}
        for key, g in grads.items():
            m = self.beta1 * m_buf[key] + (1.0 - self.beta1) * g
            v = self._second_moment(v_buf[key], g)
            m_buf[key], v_buf[key] = m, v
            update[key] = lr_t * m / (np.sqrt(v) + self.tau)
        return update


class ServerAdam(_AdaptiveOptimizer):
    """FedAdam (Reddi et al. 2021, Alg. 2) with flwr's bias-corrected step size.

    ``m_t = β₁ m + (1-β₁) g``;  ``v_t = β₂ v + (1-β₂) g²``;
    ``η_t = η √(1-β₂^(t+1)) / (1-β₁^(t+1))``;  ``u_t = η_t m_t / (√v_t + τ)``.

    The paper has no bias correction; flwr's ``FedAdam`` multiplies η by Kingma & Ba's factor with
    exponent ``server_round + 1`` (round 1 → exponent 2). We do the same with ``t`` = this
    optimizer's step count (= flwr's server_round in a sync run from round 1), so the two
    implementations agree step for step. State ``m, v`` start at 0.
    """

    name = "adam"

    def _effective_lr(self) -> float:
        t = self.step_count + 1.0
        return self.lr * math.sqrt(1.0 - self.beta2**t) / (1.0 - self.beta1**t)

    def _second_moment(self, v: np.ndarray, g: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1.0 - self.beta2) * g * g


class ServerYogi(_AdaptiveOptimizer):
    """FedYogi (Reddi et al. 2021, Alg. 2), as flwr's ``FedYogi`` (no bias correction, v₀ = 0).

    ``m_t = β₁ m + (1-β₁) g``;  ``v_t = v - (1-β₂) g² sign(v - g²)``;
    ``u_t = η m_t / (√v_t + τ)``.
    """

    name = "yogi"

    def _second_moment(self, v: np.ndarray, g: np.ndarray) -> np.ndarray:
        g2 = g * g
        return v - (1.0 - self.beta2) * g2 * np.sign(v - g2)


class ServerAdagrad(_AdaptiveOptimizer):
    """FedAdagrad (Reddi et al. 2021, Alg. 2), as flwr's ``FedAdagrad``.

    ``m_t = β₁ m + (1-β₁) g`` with β₁ = 0 by default (flwr fixes β₁ = 0, so ``m_t = g_t``);
    ``v_t = v + g²``;  ``u_t = η m_t / (√v_t + τ)``.
    """

    name = "adagrad"

    def __init__(
        self,
        lr: float,
        tau: float = 1e-3,
        beta1: float = 0.0,
        clip_update_norm: float | None = None,
    ) -> None:
        super().__init__(lr, beta1=beta1, beta2=0.0, tau=tau, clip_update_norm=clip_update_norm)

    def _second_moment(self, v: np.ndarray, g: np.ndarray) -> np.ndarray:
        return v + g * g


def build_optimizer(cfg: StrategyConfig) -> ServerOptimizer:
    """The optimizer named by ``cfg.optimizer`` with the config's hyperparameters.

    ``adagrad`` uses β₁ = 0 whatever ``cfg.beta1`` says, as flwr's FedAdagrad.
    """
    if cfg.optimizer == "sgd":
        return ServerSGD(cfg.server_lr, cfg.momentum, cfg.nesterov, cfg.clip_update_norm)
    if cfg.optimizer == "adam":
        return ServerAdam(cfg.server_lr, cfg.beta1, cfg.beta2, cfg.tau, cfg.clip_update_norm)
    if cfg.optimizer == "yogi":
        return ServerYogi(cfg.server_lr, cfg.beta1, cfg.beta2, cfg.tau, cfg.clip_update_norm)
    if cfg.optimizer == "adagrad":
        return ServerAdagrad(cfg.server_lr, cfg.tau, clip_update_norm=cfg.clip_update_norm)
    raise ValueError(
        f"strategy.optimizer must be one of sgd, adam, yogi, adagrad, got {cfg.optimizer!r}"
    )
