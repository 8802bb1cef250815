"""Robust aggregation's default: reject an update whose norm is far above the typical one.

Each valid reply's update norm ``ν = ‖d‖₂`` (one L2 norm over the floating arrays, computed by
:mod:`.validation` while it checks the reply) is judged against the median of the recent norms.
With ``k = strategy.max_norm_ratio`` the reply is rejected (reason ``norm_outlier``) when

    ν > k · m,    m = median(W),

where the window ``W`` holds the norms of the last :data:`WINDOW` valid replies, the reply's own
included, this aggregate's and the previous ones' (rejected ones too: the median does not care,
and a window of accepted norms only could drift). Nothing is rejected while ``m = 0``.

Why a window and not the round's own median: replies are folded into the running sum as they
arrive and never kept (the server's memory is O(model)), so when the first reply of a round is
folded the median of that round is not known yet. The window stands in for it: the most recent
norms, which include the round's own as they come, and which persist across aggregates (and in
checkpoints, so a resumed run decides exactly as an uninterrupted one).

Warm-up. With fewer than :data:`MIN_NORMS` norms known (the first replies of a run) a median
means nothing: one bad reply out of two is half of its own reference. Such replies are *held*,
not folded, at most ``MIN_NORMS - 1`` of them (memory stays O(model)), until the third norm
arrives or the aggregate is closed (``StreamingAggregator.settle``); each is then judged against
the median of the window at that moment. A first aggregate of one or two replies cannot tell an
outlier from an honest update (one norm is its own median; of two, the larger is at most twice
their median): they are accepted for ``k ≥ 2``.

Guarantee. Let the window hold at least :data:`MIN_NORMS` norms, fewer than half of them from
bad replies. Then ``m`` lies between two honest norms, ``m ≤ ν_max`` (the largest honest norm
in the window), and every accepted reply has ``ν_i ≤ k · ν_max``. The aggregate
``Δ = Σ n_i s_i d_i / Σ n_i`` (``s_i ≤ 1``) is a sub-convex combination of accepted deltas, so

    ‖Δ‖ ≤ Σ (n_i s_i / Σ n_j) ‖d_i‖ ≤ max_i ν_i ≤ k · ν_max,

whatever a bad client sends (an update scaled by 1000, any ``num-examples`` it claims): one
client moves the model by at most ``k`` honest updates' worth, and one scaled by more than
``k · m / ν_own`` is rejected outright. NaN, inf and wrong shapes never get here (validation).
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from typing import Any

log = logging.getLogger(__name__)

#: norms the median is taken over, the judged reply's included: a cohort of 10 -> ~3 rounds
WINDOW = 32
#: norms needed before a median can judge a reply (with 2, one outlier is half the reference)
MIN_NORMS = 3


class NormFilter:
    """The window of recent update norms and the ``ν > k · median`` test."""

    def __init__(self, ratio: float) -> None:
        if not ratio > 1:
            raise ValueError(f"strategy.max_norm_ratio must be > 1 or null, got {ratio}")
        self.ratio = float(ratio)
        self.norms: deque[float] = deque(maxlen=WINDOW)

    @property
    def ready(self) -> bool:
        """Enough norms are known for the median to judge a reply."""
        return len(self.norms) >= MIN_NORMS

    def record(self, norm: float) -> None:
        """Add a valid reply's norm to the window (before it is judged)."""
        self.norms.append(float(norm))

    def is_outlier(self, norm: float) -> tuple[bool, float]:
        """``(ν > k · m, m)`` with ``m`` the median of the window."""
        median = statistics.median(self.norms) if self.norms else 0.0
        return median > 0 and norm > self.ratio * median, median

    def state_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "norms": list(self.norms)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.norms = deque((float(v) for v in state["norms"]), maxlen=WINDOW)
