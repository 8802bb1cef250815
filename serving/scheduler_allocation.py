"""How many engines each loaded version gets: measured demand in, engine counts out.

Demand (:class:`DemandMeter`), per version and in engines (the average number of engines it
keeps busy)::

    demand = arrival_rate_rows_per_s * row_seconds  +  outstanding_seconds / period

``row_seconds`` is the version's EWMA of run time per row, ``outstanding_seconds`` the rows queued
or running times that EWMA (the dispatcher's least-loaded key, summed), ``period`` the rebalancing
period: the first term is the load being offered, the second the backlog to clear within one
period. Each sample is smoothed (``SMOOTHING``) so one burst does not move engines.

Allocation (:func:`allocate`): every version keeps at least one engine; the rest of the budget is
shared in proportion to demand, which gives each version its ideal, fractional share
``ideal_i = 1 + spare * demand_i / sum(demand)``, but no more than it needs: ``1 + HEADROOM *
demand_i`` (twice the engines it keeps busy). What nobody needs stays free, so a version loaded
next takes a free engine instead of draining one. Free engines go, one at a time, to the version
furthest below its ideal while one is below it by more than half an engine. An engine moves from
version i (the one furthest above its ideal) to version j (furthest below) only while
``(held_i - ideal_i) + (ideal_j - held_j) > 1 + HYSTERESIS``: the move must bring both closer to
their ideal by a margin. Right after a move the reverse move's sum is ``2 - (that sum) <
1 - HYSTERESIS``, so allocations do not flap unless demand itself changes by more than the margin;
a version above its ideal by more than ``1 + HYSTERESIS`` gives an engine back to the free ones.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import TypeVar

K = TypeVar("K", bound=Hashable)

#: weight of the newest sample in the smoothed demand
SMOOTHING = 0.5
#: how much better (in engines, summed over both versions) a move must make the allocation
HYSTERESIS = 0.5
#: run time per row assumed before a version has run anything
UNMEASURED_ROW_S = 1e-4
#: a version's share is capped at 1 + HEADROOM x its demand (in engines)
HEADROOM = 2.0


def ideal_shares(demand: Mapping[K, float], total: int) -> dict[K, float]:
    """Each version's fractional engine share: 1 each, the spare in proportion to demand, capped
    at what it needs (``1 + HEADROOM * demand``)."""
    n = len(demand)
    if n == 0:
        return {}
    spare = max(0, total - n)
    weight = sum(demand.values())
    if weight <= 0:
        return {k: 1.0 for k in demand}
    return {k: 1 + min(spare * d / weight, HEADROOM * d) for k, d in demand.items()}


def allocate(
    demand: Mapping[K, float],
    held: Mapping[K, int],
    total: int,
    hysteresis: float = HYSTERESIS,
) -> dict[K, int]:
    """Engines per version for a budget of ``total`` (see the module docstring); their sum may
    be below ``total`` (free engines).

    ``held`` is the current allocation (same keys as ``demand``); a version never gets fewer
    than 1. When ``total`` is below the number of versions every version keeps 1."""
    ideal = ideal_shares(demand, total)
    target = {k: max(1, int(held.get(k, 1))) for k in demand}
    if not target:
        return target

    def gap(k: K) -> float:  # > 0: below its ideal
        return ideal[k] - target[k]

    while sum(target.values()) > max(total, len(target)):  # over budget: shed from the richest
        k = min((k for k in target if target[k] > 1), key=gap)
        target[k] -= 1
    while sum(target.values()) < total:  # free engines: to the neediest, while one needs one
        k = max(target, key=gap)
        if gap(k) <= 0.5:
            break
        target[k] += 1
    while True:
        donors = [k for k in target if target[k] > 1]
        if not donors:
            return target
        i = min(donors, key=gap)
        j = max(target, key=gap)
        if -gap(i) > 1 + hysteresis and gap(j) <= 0.5:  # more than it needs: give one back
            target[i] -= 1
            continue
        if i == j or -gap(i) + gap(j) <= 1 + hysteresis:
            return target
        target[i] -= 1
        target[j] += 1


@dataclass
class _Sample:
    rows: int
    at: float
    demand: float


class DemandMeter:
    """Smoothed demand per version, from the counters its pool keeps (see the module docstring)."""

    def __init__(self, period_s: float, smoothing: float = SMOOTHING) -> None:
        self.period_s = float(period_s)
        self.smoothing = float(smoothing)
        self._last: dict[Hashable, _Sample] = {}

    def sample(
        self,
        key: Hashable,
        arrived_rows: int,
        outstanding_s: float,
        row_s: float,
        now: float,
    ) -> float:
        """The smoothed demand of ``key`` given its pool's counters at ``now``."""
        last = self._last.get(key)
        backlog = outstanding_s / self.period_s
        if last is None:
            demand = backlog
        else:
            dt = max(1e-3, now - last.at)
            rate = max(0, arrived_rows - last.rows) / dt
            raw = rate * (row_s or UNMEASURED_ROW_S) + backlog
            demand = last.demand + self.smoothing * (raw - last.demand)
        self._last[key] = _Sample(arrived_rows, now, demand)
        return demand

    def forget(self, keep: set[Hashable]) -> None:
        """Drop the history of versions not in ``keep`` (unloaded)."""
        self._last = {k: v for k, v in self._last.items() if k in keep}
