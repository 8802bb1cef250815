"""``mode: sync``: one cohort per round, replies folded as they arrive, one version per round.

Each round samples ``⌈fraction_train · N⌉`` partitions, pushes the global arrays to their nodes
and pulls replies as they arrive, validating and folding each at once, until every node replied or
``min(round_timeout_s, timeout)`` passed. With at least ``min_replies`` accepted replies the server
optimizer makes the next version; otherwise the round is retried with a new cohort, up to
``max_round_retries`` times, then :class:`RoundFailedError` stops the run (the last good version
was already handed to ``on_version``, i.e. checkpointed by the app). ``on_version`` returning True
ends the run after that version (nothing is in flight between two sync rounds).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING

from flwr.app import Message, MetricRecord

from server.strategy.aggregator import aggregate_metric_records
from server.strategy.events import RoundFailedError

if TYPE_CHECKING:
    from server.strategy.events import RunContext
    from server.strategy.parameter_server import ParameterServer

log = logging.getLogger(__name__)


def run_sync(server: ParameterServer, ctx: RunContext) -> None:
    cfg = server.cfg
    size = server.sampler.cohort_size(cfg.fraction_train)
    if size < cfg.min_replies:
        raise ValueError(
            f"strategy.min_replies={cfg.min_replies} exceeds the cohort size {size} "
            f"(ceil(fraction_train={cfg.fraction_train} x {len(server.sampler.node_of)} "
            "partitions)); lower min_replies or raise fraction_train"
        )
    while not ctx.finished(server.version):
        server_round = server.round + 1
        timed_out = 0
        attempts = cfg.max_round_retries + 1
        for attempt in range(1, attempts + 1):
            agg = server.aggregator
            agg.reset()
            cohort = server.sampler.sample(size)
            messages = server.train_messages(cohort, server_round, ctx.train_config, ctx.timeout)
            ids = ctx.messenger.push(messages)
            pending: dict[str, object] = {}
            for message_id, partition in zip(ids, cohort, strict=True):
                if message_id is None:
                    agg.reject("error", server.sampler.node_of[partition], "push refused")
                else:
                    pending[message_id] = partition
            deadline = ctx.messenger.clock() + ctx.timeout
            for reply in ctx.messenger.collect(pending, deadline):
                pending.pop(reply.metadata.reply_to_message_id)
                server.fold_reply(reply, start_version=server.version, staleness=0)
            timed_out = len(pending)
            if timed_out:
                log.warning(
                    "round %d: %d of %d clients did not reply within %.1fs (partitions %s)",
                    server_round,
                    timed_out,
                    len(cohort),
                    ctx.timeout,
                    sorted(pending.values()),  # type: ignore[type-var]
                )
            if agg.num_accepted >= cfg.min_replies:
                break
            server.counters["failed_rounds"] += 1
            log.error(
                "round %d attempt %d/%d: %d of %d replies accepted (rejected %s, timed out %d), "
                "min_replies=%d%s",
                server_round,
                attempt,
                attempts,
                agg.num_accepted,
                len(cohort),
                dict(agg.rejected),
                timed_out,
                cfg.min_replies,
                "; retrying with a new cohort" if attempt < attempts else "",
            )
        else:
            raise RoundFailedError(
                f"round {server_round} failed {attempts} time(s): fewer than "
                f"strategy.min_replies={cfg.min_replies} accepted replies each time; the last "
                f"good global version is {server.version}. Check the clients' logs, or raise "
                "strategy.round_timeout_s / max_round_retries, or lower min_replies"
            )
        server.round = server_round
        server.publish(ctx, timed_out=timed_out)


def federated_evaluate(server: ParameterServer, ctx: RunContext) -> MetricRecord | None:
    """Send the new version to ``⌈fraction_evaluate · N⌉`` partitions; average their metrics."""
    sampler = server.eval_sampler
    cohort = sampler.sample(sampler.cohort_size(server.cfg.fraction_evaluate))
    messages = server.evaluate_messages(cohort, server.round, ctx.evaluate_config, ctx.timeout)
    ids = ctx.messenger.push(messages)
    pending: dict[str, object] = {i: p for i, p in zip(ids, cohort, strict=True) if i}
    replies = []
    for reply in ctx.messenger.collect(pending, ctx.messenger.clock() + ctx.timeout):
        pending.pop(reply.metadata.reply_to_message_id)
        replies.append(reply)
    if pending:
        log.warning("federated evaluation: %d client(s) did not reply in time", len(pending))
    return average_evaluate_replies(server.counters, replies)


def average_evaluate_replies(
    counters: Counter[str], replies: Iterable[Message]
) -> MetricRecord | None:
    """The clients' evaluation metrics, averaged; an error reply is counted and logged."""
    records = []
    for reply in replies:
        if reply.has_error():
            counters["evaluate_error"] += 1
            log.warning(
                "evaluate reply from node %d is an error: %s",
                reply.metadata.src_node_id,
                reply.error.reason,
            )
            continue
        records.extend(reply.content.metric_records.values())
    return aggregate_metric_records(records)
