"""ParameterServer: the Flower strategy over the parameter server's state and loops.

This is the thin adapter between Flower and :mod:`server.strategy`: it builds the
:class:`ServerState` (global arrays, optimizer, samplers, version; see :mod:`.state` for the
math), and :meth:`ParameterServer.start` overrides ``Strategy.start`` with a streaming loop on
``grid.push_messages`` / ``grid.pull_messages``: ``mode: sync`` (:mod:`.sync_loop`) or
``mode: async`` (FedBuff, :mod:`.async_loop`). Every version the loop makes goes, as one
:class:`VersionEvent`, to the caller's :class:`VersionSink`, inline or on a background thread
(``strategy.publish_in_background``, :mod:`.sink`). The four ``configure_*``/``aggregate_*``
methods delegate to :class:`BatchHooks`, so the base class's batch ``start`` also works with this
strategy (without streaming).

Cohorts are drawn over partition ids (found by a "query" message at start) with a seeded
generator, so the same seed gives the same run under ``flwr run`` and our simulation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from server.strategy.async_loop import run_async
from server.strategy.batch_hooks import BatchHooks
from server.strategy.config import StrategyConfig
from server.strategy.events import VersionEvent
from server.strategy.messaging import Clock, Messenger, Sleep, discover_partitions, to_array_record
from server.strategy.run import RunContext
from server.strategy.sink import BackgroundRunner, InlineRunner, SinkRunner, VersionSink
from server.strategy.state import ServerState
from server.strategy.summary import log_summary
from server.strategy.sync_loop import run_sync

log = logging.getLogger(__name__)

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class ParameterServer(Strategy):
    """Sync or asynchronous (FedBuff) parameter server over Flower's Grid.

    Parameters
    ----------
    cfg : StrategyConfig
        Optimizer, mode, sampling, validation and timeouts (``task/config.py``).
    seed : int
        Seeds the cohort samplers (the experiment's ``seed``).
    min_nodes : int
        Wait for this many connected nodes before the partition query (``num_clients``).
    poll_interval : float
        Seconds to sleep between two ``pull_messages`` that returned nothing.
    drain_timeout : float
        Async mode: at most this long, after the last version, to wait for (and discard) the
        replies still in flight.
    clock, sleep
        Time source and sleep; tests pass a virtual clock.

    ``state`` is the server state (:class:`ServerState`): load a checkpoint into it before
    :meth:`start` to resume.
    """

    def __init__(
        self,
        cfg: StrategyConfig,
        *,
        seed: int = 0,
        min_nodes: int = 1,
        poll_interval: float = 0.1,
        drain_timeout: float = 60.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
    ) -> None:
        cfg.validate()
        if cfg.implementation != "parameter_server":
            raise ValueError(
                f"ParameterServer needs strategy.implementation='parameter_server', got "
                f"{cfg.implementation!r} (use flwr's FedAvg for 'flower_fedavg')"
            )
        self.cfg = cfg
        self.state = ServerState(cfg, seed)
        self.min_nodes = int(min_nodes)
        self.poll_interval = float(poll_interval)
        self.drain_timeout = float(drain_timeout)
        self.clock = clock
        self.sleep = sleep
        self.batch = BatchHooks(self.state, self.ensure_partitions)

    def summary(self) -> None:
        log_summary(self.cfg, self.state.seed)

    def ensure_partitions(
        self, grid: Grid, timeout: float | None = None, config: ConfigRecord | None = None
    ) -> None:
        """Discover ``{partition-id: node-id}`` by a query message (carrying ``config``) unless
        already known; ``timeout`` defaults to ``strategy.discovery_timeout_s``."""
        state = self.state
        if state.sampler.node_of:
            return
        messenger = Messenger(grid, self.poll_interval, self.clock, self.sleep)
        wait = self.cfg.discovery_timeout_s if timeout is None else timeout
        node_of = discover_partitions(
            messenger, min_nodes=self.min_nodes, timeout=wait, config=config
        )
        state.sampler.set_nodes(node_of)
        state.eval_sampler.set_nodes(node_of)

    # ------------------------------------------------------- Strategy (batch)
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.batch.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.batch.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.batch.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.batch.aggregate_evaluate(server_round, replies)

    # ------------------------------------------------------------ streaming
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
        *,
        sink: VersionSink | None = None,
    ) -> Result:
        """Run until the global version reaches ``num_rounds`` (a total, also when resuming).

        Sync mode makes one version per round; async mode one per ``buffer_size`` accepted
        replies. ``timeout`` caps every wait (per round in sync, per reply in async, together
        with ``strategy.round_timeout_s``: the smaller wins) and is the messages' TTL. A state
        loaded into :attr:`state` (a checkpoint) continues from its version and arrays;
        otherwise the run starts from ``initial_arrays``.
        ``evaluate_fn(version, arrays)`` runs for version 0 (fresh runs only) and after every
        version, as in Flower; ``sink.accept`` receives every version's :class:`VersionEvent`
        and returning ``True`` stops the run after that version (early stop at a target
        accuracy); async mode then drains the replies in flight as at a normal end.
        With ``strategy.publish_in_background`` both run on a worker thread, in version order,
        while the clients train on; ``start`` returns once every made version was handed over.
        An early stop then takes effect at the loop's next check: the versions made meanwhile
        (at most two) are kept and handed over too.
        """
        state = self.state
        if state.arrays is None:
            state.set_arrays(initial_arrays)
        log.info(
            "Starting ParameterServer from version %d to %d (%s)",
            state.version,
            num_rounds,
            self.cfg.mode,
        )
        self.summary()
        wait = float(min(timeout, self.cfg.round_timeout_s))
        result = Result()
        if evaluate_fn is not None and state.version == 0:
            initial = evaluate_fn(0, state.array_record())
            if initial is not None:
                result.evaluate_metrics_serverapp[0] = initial
                log.info("initial global evaluation: %s", dict(initial))
        flower = _FlowerResultSink(result, evaluate_fn, sink)
        runner: SinkRunner = (
            BackgroundRunner(flower) if self.cfg.publish_in_background else InlineRunner(flower)
        )
        started = self.clock()
        ctx = RunContext(
            messenger=Messenger(grid, self.poll_interval, self.clock, self.sleep),
            num_rounds=int(num_rounds),
            timeout=wait,
            train_config=train_config if train_config is not None else ConfigRecord(),
            evaluate_config=evaluate_config if evaluate_config is not None else ConfigRecord(),
            runner=runner,
            last_version_at=started,
        )
        try:
            if state.version < num_rounds:
                self.ensure_partitions(grid)
                if self.cfg.mode == "sync":
                    run_sync(state, ctx)
                else:
                    run_async(state, ctx, self.drain_timeout)
        finally:
            runner.close()  # every made version handed over (checkpointed) first
        result.arrays = state.published_record()
        log.info(
            "ParameterServer finished at version %d%s in %.1fs; totals %s",
            state.version,
            " (stopped early by the version sink)" if runner.stop_requested else "",
            self.clock() - started,
            dict(state.counters),
        )
        return result


class _FlowerResultSink:
    """Flower's side of each version: the Result's metrics and ``evaluate_fn``; then the
    caller's sink (whose answer is the stop request)."""

    def __init__(
        self, result: Result, evaluate_fn: EvaluateFn | None, sink: VersionSink | None
    ) -> None:
        self.result = result
        self.evaluate_fn = evaluate_fn
        self.sink = sink

    def accept(self, event: VersionEvent) -> bool:
        self.result.train_metrics_clientapp[event.version] = event.train_metrics
        if event.client_eval_metrics is not None:
            self.result.evaluate_metrics_clientapp[event.version] = event.client_eval_metrics
        if self.evaluate_fn is not None:
            metrics = self.evaluate_fn(event.version, to_array_record(event.arrays))
            if metrics is not None:
                self.result.evaluate_metrics_serverapp[event.version] = metrics
        return self.sink.accept(event) if self.sink is not None else False

    def close(self) -> None:
        """Nothing to flush: the caller closes its own sink."""
