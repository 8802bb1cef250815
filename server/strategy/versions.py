"""Publishing a new global version: update, evaluate, history, ``on_version``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from server.strategy.events import RunContext, VersionEvent
from server.strategy.sync_loop import federated_evaluate

if TYPE_CHECKING:
    from server.strategy.parameter_server import ParameterServer

log = logging.getLogger("server.strategy.parameter_server")


def publish_version(
    server: ParameterServer, ctx: RunContext, *, dropped: int = 0, timed_out: int = 0
) -> VersionEvent:
    """After an accepted aggregate: update, evaluate, record history, call ``on_version``.

    ``on_version`` returning ``True`` (e.g. a target accuracy was reached; only the bool ``True``,
    so a callback that happens to return a value, like a checkpoint path, does not stop the run)
    sets ``ctx.stop_requested``: the loops make no further version.
    """
    agg = server.aggregator
    train_metrics = agg.metrics()
    rejected = dict(agg.rejected)
    accepted = agg.num_accepted
    update_norm = server.apply_update()
    assert server.arrays is not None
    server.counters.update({"accepted": accepted, "dropped": dropped, "timed_out": timed_out})
    server.counters.update({f"rejected_{k}": v for k, v in rejected.items()})
    eval_metrics = None
    if ctx.evaluate_fn is not None:
        eval_metrics = ctx.evaluate_fn(server.version, server.array_record())
        if eval_metrics is not None:
            ctx.result.evaluate_metrics_serverapp[server.version] = eval_metrics
    client_eval = None
    if server.cfg.mode == "sync" and server.cfg.fraction_evaluate > 0:
        client_eval = federated_evaluate(server, ctx)
        if client_eval is not None:
            ctx.result.evaluate_metrics_clientapp[server.version] = client_eval
    ctx.result.train_metrics_clientapp[server.version] = train_metrics
    now = server.clock()
    event = VersionEvent(
        version=server.version,
        round=server.round,
        arrays=server.arrays,
        train_metrics=train_metrics,
        eval_metrics=eval_metrics,
        client_eval_metrics=client_eval,
        num_accepted=accepted,
        num_rejected=sum(rejected.values()),
        num_dropped=dropped,
        num_timed_out=timed_out,
        rejected_by_reason=rejected,
        seconds=now - ctx.last_version_at,
        elapsed=now - ctx.started,
        update_norm=update_norm,
    )
    ctx.last_version_at = now
    server.history.append(
        {
            "version": event.version,
            "round": event.round,
            "train": dict(train_metrics),
            "eval": dict(eval_metrics) if eval_metrics is not None else None,
            "client_eval": dict(client_eval) if client_eval is not None else None,
            "accepted": accepted,
            "rejected": rejected,
            "dropped": dropped,
            "timed_out": timed_out,
            "seconds": event.seconds,
            "update_norm": update_norm,
        }
    )
    log.info(
        "version %d (round %d): %d accepted, %d rejected, %d dropped, %d timed out, "
        "|u|=%.4g, %.2fs%s",
        event.version,
        event.round,
        accepted,
        event.num_rejected,
        dropped,
        timed_out,
        update_norm,
        event.seconds,
        f", eval {dict(eval_metrics)}" if eval_metrics is not None else "",
    )
    if ctx.on_version is not None and ctx.on_version(event) is True:
        ctx.stop_requested = True
        log.info("on_version asked to stop after version %d", event.version)
    agg.reset()
    return event
