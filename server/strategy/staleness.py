"""Staleness weighting for asynchronous (buffered) aggregation.

FedBuff (Nguyen et al. 2022, "Federated Learning with Buffered Asynchronous Aggregation") scales
a reply computed on global version ``v_start`` and arriving when the server is at version ``v`` by

    τ = v - v_start,        s(τ) = 1 / √(1 + τ)

and drops replies with ``τ > max_staleness``. The aggregation weight is then
``num-examples · s(τ)``.
"""

from __future__ import annotations

import math


def staleness_weight(staleness: int) -> float:
    """``s(τ) = 1/√(1+τ)``; τ < 0 (a reply from the future) is an error."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return 1.0 / math.sqrt(1.0 + staleness)


class StalenessPolicy:
    """Decides whether a reply is too stale and how much it weighs."""

    def __init__(self, max_staleness: int) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.max_staleness = int(max_staleness)

    def staleness(self, current_version: int, start_version: int) -> int:
        return int(current_version) - int(start_version)

    def accepts(self, staleness: int) -> bool:
        return 0 <= staleness <= self.max_staleness

    def weight(self, staleness: int) -> float:
        return staleness_weight(staleness)
