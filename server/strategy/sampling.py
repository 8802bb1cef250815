"""Seeded sampling over partition ids, independent of the node ids the runtime assigned.

At start the server asks every node for its ``partition-id`` (a "query" message). Cohorts are then
drawn from the *sorted* partition ids with one generator,
``numpy.random.Generator(PCG64(SeedSequence([seed, stream])))`` (stream 0: training cohorts,
stream 1: federated evaluation), so the same seed selects the same partitions whether the nodes
came from ``flwr run`` or from our simulation, whatever their node ids. The generator's
``bit_generator.state`` is part of :meth:`state_dict`, so a resumed run continues the same
sequence of cohorts.

Async mode picks one idle partition per free slot: uniformly (FedBuff), or ``balanced``: among
the idle partitions sent the fewest models so far, uniformly. A fast client is idle again 5x as
often as a 5x slower one, so uniform picking gives it 5x the updates and its (non-IID) data 5x the
say; balanced picking sends every free slot to the least-served client that can take it.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np


class PartitionSampler:
    """Maps partition ids to node ids and draws cohorts / idle partitions reproducibly."""

    def __init__(self, seed: int, stream: int = 0) -> None:
        self.seed = int(seed)
        self.stream = int(stream)
        self.rng = self._generator()
        self.node_of: dict[int, int] = {}
        self.picked: Counter[int] = Counter()  # models sent per partition by :meth:`pick`

    def _generator(self) -> np.random.Generator:
        return np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([self.seed, self.stream]))
        )

    @property
    def partitions(self) -> list[int]:
        return sorted(self.node_of)

    def set_nodes(self, node_of: dict[int, int]) -> None:
        """Install the ``partition-id → node-id`` map discovered by the query round."""
        self.node_of = {int(p): int(n) for p, n in node_of.items()}

    def cohort_size(self, fraction: float) -> int:
        """``⌈fraction · N⌉`` of the N known partitions (at least 1 when N > 0)."""
        n = len(self.node_of)
        return min(n, max(1, math.ceil(fraction * n - 1e-9))) if n else 0

    def sample(self, size: int) -> list[int]:
        """``size`` distinct partition ids, without replacement, returned sorted."""
        candidates = self.partitions
        if size > len(candidates):
            raise ValueError(f"cannot sample {size} partitions out of {len(candidates)}")
        chosen = self.rng.choice(len(candidates), size=size, replace=False)
        return sorted(candidates[int(i)] for i in chosen)

    def pick(self, busy: Iterable[int], balanced: bool = False) -> int | None:
        """One partition not in ``busy``, uniformly (``balanced``: among those picked the fewest
        times so far); None when all are busy."""
        taken = set(busy)
        idle = [p for p in self.partitions if p not in taken]
        if not idle:
            return None
        if balanced:
            fewest = min(self.picked[p] for p in idle)
            idle = [p for p in idle if self.picked[p] == fewest]
        chosen = idle[int(self.rng.integers(len(idle)))]
        self.picked[chosen] += 1
        return chosen

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "stream": self.stream,
            "bit_generator": copy.deepcopy(self.rng.bit_generator.state),
            "picked": dict(self.picked),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.stream = int(state["stream"])
        self.rng = self._generator()
        self.rng.bit_generator.state = copy.deepcopy(state["bit_generator"])
        self.picked = Counter({int(p): int(n) for p, n in state.get("picked", {}).items()})
