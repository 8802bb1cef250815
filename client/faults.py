"""Injected client faults (config section ``faults``, :class:`task.config.FaultsConfig`).

Which partitions are faulty is a pure function of the config, the run's seed, the number of
partitions and, with ``faults.per_round``, the global version the client was sent: a seeded
permutation of the partitions is cut into consecutive blocks of ``round(fraction · n)`` for
crash, straggle, nan, wrong_shape and scale, in that order. Every client computes the same
assignment, and tests and benchmarks can ask :func:`assignment` which partitions were hit.

What each fault does to a train reply:

* ``crash``: training raises :class:`InjectedCrash` (the client answers with an error reply).
* ``straggle``: the emulated device takes ``straggle_factor`` x the message's TTL, so the reply
  would come after the server stopped waiting; the client sleeps until its deadline and gives
  up there (see :mod:`client.deadline`), without training.
* ``nan``: the first floating array of the update is NaN.
* ``wrong_shape``: the first floating array of the update gets one element too many (flattened).
* ``scale``: every floating array of the update is multiplied by ``scale_factor``.
"""

from __future__ import annotations

import numpy as np
import torch

from task.config import FAULTS, FaultsConfig


class InjectedCrash(RuntimeError):
    """The ``crash`` fault: what a client whose training fails raises."""


def assignment(
    cfg: FaultsConfig, num_partitions: int, seed: int, version: int = 0
) -> dict[int, str]:
    """``{partition: fault kind}`` for the faulty partitions (``version`` counts only with
    ``per_round``)."""
    if not cfg.enabled():
        return {}
    entropy = [int(seed), int(cfg.seed), int(version) if cfg.per_round else -1]
    rng = np.random.default_rng(np.random.SeedSequence([e & 0xFFFFFFFF for e in entropy]))
    order = rng.permutation(num_partitions).tolist()
    faulty: dict[int, str] = {}
    start = 0
    for kind in FAULTS:
        count = round(cfg.fractions()[kind] * num_partitions)
        for partition in order[start : start + count]:
            faulty[int(partition)] = kind
        start += count
    return faulty


def fault_of(
    cfg: FaultsConfig, partition: int, num_partitions: int, seed: int, version: int
) -> str | None:
    """The fault kind of ``partition`` for a model of global ``version``, or None."""
    return assignment(cfg, num_partitions, seed, version).get(partition)


def corrupt_update(
    kind: str, delta: dict[str, torch.Tensor], scale_factor: float
) -> dict[str, torch.Tensor]:
    """The update a client with fault ``kind`` (nan, wrong_shape or scale) replies instead of
    ``delta`` (new tensors; ``delta`` is not modified)."""
    floating = [key for key, value in delta.items() if value.is_floating_point()]
    out = dict(delta)
    if kind == "scale":
        for key in floating:
            out[key] = delta[key] * scale_factor
    elif kind == "nan":
        out[floating[0]] = torch.full_like(delta[floating[0]], float("nan"))
    elif kind == "wrong_shape":
        first = delta[floating[0]].reshape(-1)
        out[floating[0]] = torch.cat([first, first.new_zeros(1)])
    else:
        raise ValueError(f"fault {kind!r} does not corrupt an update")
    return out
