"""The base ``Strategy.start``'s four hooks, for :class:`~server.strategy.ParameterServer`.

``ParameterServer.start`` streams the replies (``sync_loop`` / ``async_loop``). These hooks let
Flower's own batch ``Strategy.start`` drive the same server: ``configure_*`` draws a cohort from
the seeded samplers, ``aggregate_train`` folds the collected replies through the same validation
and optimizer step, ``aggregate_evaluate`` averages the clients' metrics.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from server.strategy.aggregator import StreamingAggregator
from server.strategy.sync_loop import average_evaluate_replies

if TYPE_CHECKING:
    from server.strategy.sampling import PartitionSampler
    from task.config import StrategyConfig

log = logging.getLogger(__name__)

# (partitions, server_round, config, ttl) -> one message per partition
MessagesFor = Callable[[Iterable[int], int, ConfigRecord | None, float], list[Message]]


class BatchStrategyHooks:
    """Mixin of ``configure_train``, ``aggregate_train``, ``configure_evaluate`` and
    ``aggregate_evaluate`` over the ParameterServer's state (declared below for type checking)."""

    if TYPE_CHECKING:
        cfg: StrategyConfig
        arrays: dict[str, np.ndarray] | None
        round: int
        version: int
        sampler: PartitionSampler
        eval_sampler: PartitionSampler
        counters: Counter[str]

        @property
        def aggregator(self) -> StreamingAggregator: ...
        def set_arrays(self, arrays: dict[str, np.ndarray] | ArrayRecord) -> None: ...
        def ensure_partitions(
            self, grid: Grid, timeout: float | None = None, config: ConfigRecord | None = None
        ) -> None: ...

        train_messages: MessagesFor
        evaluate_messages: MessagesFor

        def fold_reply(self, reply: Message, *, start_version: int, staleness: int) -> bool: ...
        def apply_update(self) -> float: ...
        def array_record(self) -> ArrayRecord: ...
        def published_record(self) -> ArrayRecord: ...

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.arrays is None:
            self.set_arrays(arrays)
        self.ensure_partitions(grid)
        cohort = self.sampler.sample(self.sampler.cohort_size(self.cfg.fraction_train))
        return self.train_messages(cohort, server_round, config, self.cfg.round_timeout_s)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        agg = self.aggregator
        agg.reset()
        for reply in replies:
            self.fold_reply(reply, start_version=self.version, staleness=0)
        if agg.num_accepted < self.cfg.min_replies:
            log.warning(
                "round %d: %d accepted replies < min_replies=%d; model unchanged",
                server_round,
                agg.num_accepted,
                self.cfg.min_replies,
            )
            return None, None
        metrics = agg.metrics()
        self.apply_update()
        self.round = server_round
        # Flower evaluates what this returns; the clients get the server's own arrays anyway
        # (configure_train ignores the arrays Flower passes back once the server has its own)
        return self.published_record(), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.cfg.fraction_evaluate == 0:
            return []
        self.ensure_partitions(grid)
        size = self.eval_sampler.cohort_size(self.cfg.fraction_evaluate)
        return self.evaluate_messages(
            self.eval_sampler.sample(size), server_round, config, self.cfg.round_timeout_s
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return average_evaluate_replies(self.counters, replies)
