"""Publishing a new global version: make it (update), then announce it (evaluate, history,
``on_version``).

Making a version is the loop's job and stays on its thread: apply the server optimizer, count,
run the federated evaluation (it uses the Grid). Announcing it — central ``evaluate_fn``, the
history entry, ``on_version`` (the app's checkpoint and export) — runs inline by default, or on
the :class:`~server.strategy.announcer.VersionAnnouncer`'s thread with
``strategy.publish_in_background``, while the clients already train on the new version.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import MetricRecord

from server.strategy.events import RunContext, VersionEvent
from server.strategy.messaging import to_array_record
from server.strategy.sync_loop import federated_evaluate

if TYPE_CHECKING:
    from server.strategy.parameter_server import ParameterServer

log = logging.getLogger("server.strategy.parameter_server")


@dataclass(frozen=True)
class MadeVersion:
    """A version as the loop made it: everything its announcement needs, fixed at that moment."""

    version: int
    round: int
    arrays: dict[str, np.ndarray]  # published (new arrays every version): these never change
    train_metrics: MetricRecord
    client_eval: MetricRecord | None
    accepted: int
    rejected: dict[str, int]
    dropped: int
    timed_out: int
    update_norm: float
    seconds: float
    elapsed: float
    made_at: float
    state: dict[str, Any] | None  # a state_dict snapshot, taken when announcing in background


def publish_version(
    server: ParameterServer, ctx: RunContext, *, dropped: int = 0, timed_out: int = 0
) -> None:
    """After an accepted aggregate: make the version, then announce it (inline or queued)."""
    made = make_version(server, ctx, dropped=dropped, timed_out=timed_out)
    if ctx.announcer is None:
        announce_version(server, ctx, made)
    else:
        ctx.announcer.submit(lambda: announce_version(server, ctx, made))


def make_version(
    server: ParameterServer, ctx: RunContext, *, dropped: int = 0, timed_out: int = 0
) -> MadeVersion:
    """Apply the buffered update, count, evaluate on clients (sync); the loop's thread only."""
    agg = server.aggregator
    train_metrics = agg.metrics()
    rejected = dict(agg.rejected)
    accepted = agg.num_accepted
    update_norm = server.apply_update()
    assert server.arrays is not None
    server.counters.update({"accepted": accepted, "dropped": dropped, "timed_out": timed_out})
    server.counters.update({f"rejected_{k}": v for k, v in rejected.items()})
    client_eval = None
    if server.cfg.mode == "sync" and server.cfg.fraction_evaluate > 0:
        client_eval = federated_evaluate(server, ctx)
        if client_eval is not None:
            ctx.result.evaluate_metrics_clientapp[server.version] = client_eval
    ctx.result.train_metrics_clientapp[server.version] = train_metrics
    now = server.clock()
    made = MadeVersion(
        version=server.version,
        round=server.round,
        arrays=server.published_arrays(),
        train_metrics=train_metrics,
        client_eval=client_eval,
        accepted=accepted,
        rejected=rejected,
        dropped=dropped,
        timed_out=timed_out,
        update_norm=update_norm,
        seconds=now - ctx.last_version_at,
        elapsed=now - ctx.started,
        made_at=time.time(),
        state=server.state_dict() if ctx.announcer is not None else None,
    )
    ctx.last_version_at = now
    agg.reset()
    return made


def announce_version(server: ParameterServer, ctx: RunContext, made: MadeVersion) -> VersionEvent:
    """Evaluate, record history, call ``on_version`` for one made version.

    ``on_version`` returning ``True`` (e.g. a target accuracy was reached; only the bool ``True``,
    so a callback that happens to return a value, like a checkpoint path, does not stop the run)
    sets ``ctx.stop_requested``: the loops make no further version (in background, the versions
    already made by then are still announced).
    """
    eval_metrics = None
    if ctx.evaluate_fn is not None:
        # inline and not averaged, the server is still at this version and publishes what it
        # sends: its cached record is the one clients get
        own = made.state is None and server.average is None
        record = server.array_record() if own else to_array_record(made.arrays)
        eval_metrics = ctx.evaluate_fn(made.version, record)
        if eval_metrics is not None:
            ctx.result.evaluate_metrics_serverapp[made.version] = eval_metrics
    server.history.append(
        {
            "version": made.version,
            "round": made.round,
            "train": dict(made.train_metrics),
            "eval": dict(eval_metrics) if eval_metrics is not None else None,
            "client_eval": dict(made.client_eval) if made.client_eval is not None else None,
            "accepted": made.accepted,
            "rejected": made.rejected,
            "dropped": made.dropped,
            "timed_out": made.timed_out,
            "seconds": made.seconds,
            "update_norm": made.update_norm,
        }
    )
    state = made.state
    if state is not None:  # announcements run in version order: the history is complete to here
        state["history"] = [dict(entry) for entry in server.history]
    event = VersionEvent(
        version=made.version,
        round=made.round,
        arrays=made.arrays,
        train_metrics=made.train_metrics,
        eval_metrics=eval_metrics,
        client_eval_metrics=made.client_eval,
        num_accepted=made.accepted,
        num_rejected=sum(made.rejected.values()),
        num_dropped=made.dropped,
        num_timed_out=made.timed_out,
        rejected_by_reason=made.rejected,
        seconds=made.seconds,
        elapsed=made.elapsed,
        update_norm=made.update_norm,
        made_at=made.made_at,
        state_dict=server.state_dict if state is None else partial(dict, state),
    )
    log.info(
        "version %d (round %d): %d accepted, %d rejected, %d dropped, %d timed out, "
        "|u|=%.4g, %.2fs%s",
        event.version,
        event.round,
        made.accepted,
        event.num_rejected,
        made.dropped,
        made.timed_out,
        made.update_norm,
        made.seconds,
        f", eval {dict(eval_metrics)}" if eval_metrics is not None else "",
    )
    if ctx.on_version is not None and ctx.on_version(event) is True:
        ctx.stop_requested = True
        log.info("on_version asked to stop after version %d", event.version)
    return event
