"""Flower's batch ``Strategy.start`` hooks over the server state.

``ParameterServer.start`` streams the replies (``sync_loop`` / ``async_loop``). These hooks let
Flower's own batch ``Strategy.start`` drive the same state: ``configure_*`` draws a cohort from
the seeded samplers, ``aggregate_train`` folds the collected replies through the same validation
and optimizer step, ``aggregate_evaluate`` averages the clients' metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from server.strategy.cohort import evaluate_messages, train_messages
from server.strategy.evaluation import average_evaluate_replies
from server.strategy.state import ServerState

log = logging.getLogger(__name__)


class BatchHooks:
    """``configure_train``, ``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate``.

    ``ensure_partitions(grid)`` discovers the partitions on the grid unless they are known.
    """

    def __init__(self, state: ServerState, ensure_partitions: Callable[[Grid], None]) -> None:
        self.state = state
        self.ensure_partitions = ensure_partitions

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        state = self.state
        if state.arrays is None:
            state.set_arrays(arrays)
        self.ensure_partitions(grid)
        cohort = state.sampler.sample(state.sampler.cohort_size(state.cfg.fraction_train))
        return train_messages(state, cohort, server_round, config, state.cfg.round_timeout_s)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        state = self.state
        agg = state.aggregator
        agg.reset()
        for reply in replies:
            state.fold(reply, start_version=state.version, staleness=0)
        agg.settle()
        if agg.num_accepted < state.cfg.min_replies:
            log.warning(
                "round %d: %d accepted replies < min_replies=%d; model unchanged",
                server_round,
                agg.num_accepted,
                state.cfg.min_replies,
            )
            return None, None
        metrics = agg.metrics()
        state.apply()
        state.round = server_round
        # Flower evaluates what this returns; the clients get the server's own arrays anyway
        # (configure_train ignores the arrays Flower passes back once the server has its own)
        return state.published_record(), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        state = self.state
        if state.cfg.fraction_evaluate == 0:
            return []
        self.ensure_partitions(grid)
        size = state.eval_sampler.cohort_size(state.cfg.fraction_evaluate)
        cohort = state.eval_sampler.sample(size)
        return evaluate_messages(state, cohort, server_round, config, state.cfg.round_timeout_s)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return average_evaluate_replies(self.state.counters, replies)
