"""The one description of a global version: what a loop hands to the version sink."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import MetricRecord


@dataclass(frozen=True)
class VersionEvent:
    """One global version, fixed when it was made.

    ``arrays`` are the published arrays (the global ones, or their average with
    ``strategy.ema_decay``): read them, copy them, never modify them. ``train_metrics`` are the
    accepted replies' metrics averaged by ``num-examples``; ``client_eval_metrics`` the federated
    evaluation (sync mode, ``fraction_evaluate > 0``). ``update_norm`` is the server update's L2
    norm. ``seconds`` is the wall time from the previous version (or the start) to this one's
    update; ``made_at`` is that moment as a ``time.time()`` stamp (train->serve latency starts
    there).
    ``state`` is the server state at this version, a snapshot a checkpoint can hold as it is
    (``ServerState.state_dict``), or None where there is no state to resume (Flower's FedAvg).
    """

    version: int
    round: int
    arrays: dict[str, np.ndarray]
    train_metrics: MetricRecord
    client_eval_metrics: MetricRecord | None
    num_accepted: int
    rejected_by_reason: dict[str, int]
    num_dropped: int
    num_timed_out: int
    update_norm: float
    seconds: float
    made_at: float
    state: dict[str, Any] | None

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected_by_reason.values())

    @property
    def counts(self) -> dict[str, int]:
        """accepted / rejected / dropped / timed_out, plus ``rejected_<reason>`` per reason."""
        counts = {
            "accepted": self.num_accepted,
            "rejected": self.num_rejected,
            "dropped": self.num_dropped,
            "timed_out": self.num_timed_out,
        }
        counts.update({f"rejected_{k}": v for k, v in self.rejected_by_reason.items()})
        return counts
