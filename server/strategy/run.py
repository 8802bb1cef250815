"""One run of a loop: what the loops share per ``start``, and how each version is made.

Making a version is the loop's job and stays on its thread: apply the server optimizer to the
aggregate, count, run the federated evaluation (it uses the Grid), snapshot the state, and hand the
frozen :class:`VersionEvent` to the sink runner (inline, or queued for the background worker).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from flwr.app import ConfigRecord

from server.strategy.evaluation import federated_evaluate
from server.strategy.events import VersionEvent
from server.strategy.messaging import Messenger
from server.strategy.sink import SinkRunner
from server.strategy.state import ServerState

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """Per-``start`` arguments and timing shared by the loops."""

    messenger: Messenger
    num_rounds: int
    timeout: float  # every wait, and the messages' TTL
    train_config: ConfigRecord
    evaluate_config: ConfigRecord
    runner: SinkRunner
    last_version_at: float  # the messenger's clock at the last version (or the start)

    def finished(self, version: int) -> bool:
        """The run makes no more versions: ``num_rounds`` reached or the sink asked to stop."""
        return self.runner.stop_requested or version >= self.num_rounds

    def make_version(self, state: ServerState, *, dropped: int = 0, timed_out: int = 0) -> None:
        """After an accepted aggregate: apply it, count, evaluate on clients (sync mode with
        ``fraction_evaluate > 0``), then hand the version to the sink and reset the aggregate."""
        agg = state.aggregator
        agg.settle()
        train_metrics = agg.metrics()
        rejected = dict(agg.rejected)
        accepted = agg.num_accepted
        update_norm = state.apply()
        state.counters.update({"accepted": accepted, "dropped": dropped, "timed_out": timed_out})
        state.counters.update({f"rejected_{k}": v for k, v in rejected.items()})
        client_eval = None
        if state.cfg.mode == "sync" and state.cfg.fraction_evaluate > 0:
            client_eval = federated_evaluate(
                state, self.messenger, self.evaluate_config, self.timeout
            )
        now = self.messenger.clock()
        event = VersionEvent(
            version=state.version,
            round=state.round,
            arrays=state.published_arrays(),  # new arrays every version: these never change
            train_metrics=train_metrics,
            client_eval_metrics=client_eval,
            num_accepted=accepted,
            rejected_by_reason=rejected,
            num_dropped=dropped,
            num_timed_out=timed_out,
            update_norm=update_norm,
            seconds=now - self.last_version_at,
            made_at=time.time(),
            state=state.state_dict(),
        )
        self.last_version_at = now
        agg.reset()
        log.info(
            "version %d (round %d): %d accepted, %d rejected, %d dropped, %d timed out, "
            "|u|=%.4g, %.2fs",
            event.version,
            event.round,
            accepted,
            event.num_rejected,
            dropped,
            timed_out,
            event.update_norm,
            event.seconds,
        )
        self.runner.submit(event)
