"""What the ParameterServer hands out per version, and the per-``start`` context of its loops."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp.strategy import Result

from server.strategy.announcer import VersionAnnouncer
from server.strategy.messaging import Messenger, to_array_record


class RoundFailedError(RuntimeError):
    """A sync round got fewer than ``min_replies`` accepted replies in every retry."""


@dataclass
class VersionEvent:
    """What ``on_version`` receives after each new global version.

    ``arrays`` are the server's own global arrays: read them, copy them, never modify them.
    ``eval_metrics`` is ``evaluate_fn``'s result for this version; ``client_eval_metrics`` the
    federated evaluation (sync mode, ``fraction_evaluate > 0``). ``seconds`` is the wall time from
    the previous version to this one's update, ``elapsed`` from ``start`` to it; ``made_at`` is that
    moment as a ``time.time()`` stamp. ``state_dict()`` is the server's state at this version (what
    a checkpoint holds): the live state when versions are announced inline, a snapshot taken when
    the version was made with ``publish_in_background`` (the server has moved on by then).
    """

    version: int
    round: int
    arrays: dict[str, np.ndarray]
    train_metrics: MetricRecord
    eval_metrics: MetricRecord | None
    client_eval_metrics: MetricRecord | None
    num_accepted: int
    num_rejected: int
    num_dropped: int
    num_timed_out: int
    rejected_by_reason: dict[str, int]
    seconds: float
    elapsed: float
    update_norm: float
    made_at: float = 0.0
    state_dict: Callable[[], dict[str, Any]] = field(default=dict, repr=False, compare=False)

    def array_record(self) -> ArrayRecord:
        return to_array_record(self.arrays)

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


@dataclass
class RunContext:
    """Per-``start`` arguments shared by the loops."""

    messenger: Messenger
    num_rounds: int
    timeout: float
    train_config: ConfigRecord
    evaluate_config: ConfigRecord
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None
    on_version: Callable[[VersionEvent], bool | None] | None
    result: Result
    started: float
    last_version_at: float
    window: Counter[str] = field(default_factory=Counter)
    announcer: VersionAnnouncer | None = None  # ``publish_in_background``: announces off the loop
    stop_requested: bool = False  # ``on_version`` returned True: no further version is made

    def finished(self, version: int) -> bool:
        """The run makes no more versions: ``num_rounds`` reached or a stop was requested."""
        return self.stop_requested or version >= self.num_rounds
