"""The workload: Zipf popularity over the model versions, a hot set that moves, open-loop arrivals.

Every request is decided before the run, from a seed, so every contender gets the same one:

* arrivals are a Poisson process of ``rate`` requests/s (open loop: the next request is sent at
  its time whether or not earlier ones were answered, so a contender that fails requests quickly
  cannot raise its own load, and latency is counted from the scheduled send time);
* the run is cut into phases of ``phase_s`` seconds; each phase draws a new random ranking of the
  versions, and a request picks rank ``k`` (1-based) with probability ``k^-s / H`` (Zipf, ``s`` =
  1.1): the hot set changes every phase;
* a request's popularity class is its version's rank in its phase: ``hot`` (ranks 1-3), ``warm``
  (4-8), ``cold`` (9 and below).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASSES = (("hot", 1, 3), ("warm", 4, 8), ("cold", 9, 10**9))


@dataclass(frozen=True)
class Target:
    """One model version the load addresses, and the request body sent to it."""

    name: str
    version: int
    path: str
    body: bytes
    header_length: int

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class Arrival:
    at_s: float
    target: int
    rank: int

    @property
    def popularity(self) -> str:
        return next(name for name, lo, hi in CLASSES if lo <= self.rank <= hi)


def zipf_weights(n: int, s: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** s
    return weights / weights.sum()


def schedule(
    n_targets: int, rate: float, phases: int, phase_s: float, s: float, seed: int
) -> list[Arrival]:
    """The run's requests in send order (see the module docstring)."""
    rng = np.random.default_rng(seed)
    weights = zipf_weights(n_targets, s)
    arrivals: list[Arrival] = []
    for phase in range(phases):
        ranking = rng.permutation(n_targets)  # ranking[k] is the version of rank k + 1
        t = phase * phase_s
        end = t + phase_s
        while True:
            t += rng.exponential(1.0 / rate)
            if t >= end:
                break
            rank = int(rng.choice(n_targets, p=weights))
            arrivals.append(Arrival(t, int(ranking[rank]), rank + 1))
    return arrivals
