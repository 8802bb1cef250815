"""Federated evaluation: send the global arrays to an evaluation cohort, average its metrics."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, MetricRecord

from server.strategy.aggregator import aggregate_metric_records
from server.strategy.cohort import evaluate_messages
from server.strategy.messaging import Messenger
from server.strategy.state import ServerState

log = logging.getLogger(__name__)


def federated_evaluate(
    state: ServerState, messenger: Messenger, config: ConfigRecord, timeout: float
) -> MetricRecord | None:
    """Send the current version to ``⌈fraction_evaluate · N⌉`` partitions (drawn by the eval
    sampler) and average the metrics of those that reply within ``timeout``."""
    sampler = state.eval_sampler
    cohort = sampler.sample(sampler.cohort_size(state.cfg.fraction_evaluate))
    ids = messenger.push(evaluate_messages(state, cohort, state.round, config, timeout))
    pending: dict[str, object] = {i: p for i, p in zip(ids, cohort, strict=True) if i}
    replies = []
    for reply in messenger.collect(pending, messenger.clock() + timeout):
        pending.pop(reply.metadata.reply_to_message_id)
        replies.append(reply)
    if pending:
        log.warning("federated evaluation: %d client(s) did not reply in time", len(pending))
    return average_evaluate_replies(state.counters, replies)


def average_evaluate_replies(
    counters: Counter[str], replies: Iterable[Message]
) -> MetricRecord | None:
    """The clients' evaluation metrics, averaged by ``num-examples``; an error reply is counted
    (``evaluate_error``) and logged."""
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
