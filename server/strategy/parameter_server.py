"""ParameterServer: a Flower strategy that aggregates client deltas the way a parameter server does.

The server holds the global arrays ``x``, the server optimizer's state and a version counter. Each
accepted client reply (``delta_i = local_i - received_i``) is validated and folded into one float64
running sum (:class:`StreamingAggregator`, O(model) memory), and every new global version is

    x_{v+1} = opt(x_v, g),   g = -Δ,   Δ = Σ n_i s_i delta_i / Σ n_i

with ``n_i`` = num-examples and ``s_i`` = 1 (sync) or FedBuff's ``1/√(1+τ_i)`` (async).
``opt = sgd(lr=1, momentum=0)`` is FedAvg exactly; momentum gives FedAvgM; adam/yogi/adagrad give
FedOpt (Reddi et al. 2021). See :mod:`server.strategy.optimizers`.

:meth:`start` overrides ``Strategy.start`` with streaming loops on ``grid.push_messages`` /
``grid.pull_messages``: ``mode: sync`` (:mod:`.sync_loop`) and ``mode: async`` (FedBuff,
:mod:`.async_loop`). The four ``configure_*``/``aggregate_*`` methods are implemented too
(:mod:`.batch_hooks`), so the base class's batch ``start`` also works with this strategy (without
streaming).

Cohorts are drawn over partition ids (found by a "query" message at start) with a seeded
generator, so the same seed gives the same run under ``flwr run`` and our simulation.
:meth:`state_dict` holds everything needed to resume bit-identically.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from server.strategy.aggregator import StreamingAggregator
from server.strategy.announcer import VersionAnnouncer
from server.strategy.async_loop import run_async
from server.strategy.averaging import ParameterAverage
from server.strategy.batch_hooks import BatchStrategyHooks
from server.strategy.events import RoundFailedError, RunContext, VersionEvent
from server.strategy.messaging import (
    Clock,
    Messenger,
    Sleep,
    discover_partitions,
    from_array_record,
    make_config,
    to_array_record,
)
from server.strategy.optimizers import build_optimizer
from server.strategy.sampling import PartitionSampler
from server.strategy.staleness import StalenessPolicy
from server.strategy.summary import log_summary
from server.strategy.sync_loop import run_sync
from server.strategy.versions import publish_version
from task.config import StrategyConfig

log = logging.getLogger(__name__)

STATE_FORMAT = 1

__all__ = ["ParameterServer", "RoundFailedError", "RunContext", "VersionEvent"]


class ParameterServer(BatchStrategyHooks, Strategy):
    """Sync or asynchronous (FedBuff) parameter server over Flower's Grid.

    Parameters
    ----------
    cfg : StrategyConfig
        Optimizer, mode, sampling, validation and timeouts (``task/config.py``).
    seed : int
        Seeds the cohort sampler (the experiment's ``seed``).
    min_nodes : int
        Wait for this many connected nodes before the partition query (``num_clients``).
    poll_interval : float
        Seconds to sleep between two ``pull_messages`` that returned nothing.
    drain_timeout : float
        Async mode: at most this long, after the last version, to wait for (and discard) the
        replies still in flight.
    clock, sleep
        Time source and sleep; tests pass a virtual clock.
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
        self.seed = int(seed)
        self.min_nodes = int(min_nodes)
        self.poll_interval = float(poll_interval)
        self.drain_timeout = float(drain_timeout)
        self.clock = clock
        self.sleep = sleep
        self.optimizer = build_optimizer(cfg)
        self.sampler = PartitionSampler(self.seed, stream=0)
        self.eval_sampler = PartitionSampler(self.seed, stream=1)
        self.staleness = StalenessPolicy(cfg.max_staleness)
        self.arrays: dict[str, np.ndarray] | None = None
        self.average = ParameterAverage(cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.version = 0
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self.counters: Counter[str] = Counter()
        self._aggregator: StreamingAggregator | None = None
        self._record: tuple[int, ArrayRecord] | None = None

    # ------------------------------------------------------------------ state
    def set_arrays(self, arrays: dict[str, np.ndarray] | ArrayRecord) -> None:
        """Install the global arrays (version 0 for a fresh run)."""
        if isinstance(arrays, ArrayRecord):
            arrays = from_array_record(arrays)
        self.arrays = {key: np.array(value, copy=True) for key, value in arrays.items()}
        self._aggregator = None
        self._record = None

    @property
    def global_arrays(self) -> dict[str, np.ndarray]:
        """The current global arrays (the server's own: do not modify)."""
        if self.arrays is None:
            raise RuntimeError("global arrays are not set; call set_arrays() or start()")
        return self.arrays

    @property
    def aggregator(self) -> StreamingAggregator:
        if self.arrays is None:
            raise RuntimeError("global arrays are not set; call set_arrays() or start()")
        if self._aggregator is None:
            self._aggregator = StreamingAggregator(
                self.arrays,
                max_update_norm=self.cfg.max_update_norm,
                aggregation=self.cfg.aggregation,
                trim_fraction=self.cfg.trim_fraction,
            )
        return self._aggregator

    def published_arrays(self) -> dict[str, np.ndarray]:
        """What a version publishes (evaluation, export): the global arrays, or their average
        with ``strategy.ema_decay`` (:mod:`server.strategy.averaging`)."""
        arrays = self.global_arrays
        return arrays if self.average is None else self.average.value(arrays)

    def published_record(self) -> ArrayRecord:
        """:meth:`published_arrays` as an ArrayRecord (the clients' record when not averaged)."""
        if self.average is None:
            return self.array_record()
        return to_array_record(self.published_arrays())

    def array_record(self) -> ArrayRecord:
        """The current global arrays as an ArrayRecord (built once per version)."""
        if self.arrays is None:
            raise RuntimeError("global arrays are not set")
        if self._record is None or self._record[0] != self.version:
            self._record = (self.version, to_array_record(self.arrays))
        return self._record[1]

    def state_dict(self) -> dict[str, Any]:
        """The whole server state (copies): arrays, optimizer, version, round, RNGs, history."""
        if self.arrays is None:
            raise RuntimeError("global arrays are not set")
        return {
            "format": STATE_FORMAT,
            "arrays": {key: value.copy() for key, value in self.arrays.items()},
            "optimizer": self.optimizer.state_dict(),
            "version": self.version,
            "round": self.round,
            "sampler": self.sampler.state_dict(),
            "eval_sampler": self.eval_sampler.state_dict(),
            "history": [dict(entry) for entry in self.history],
            "counters": dict(self.counters),
            "config": asdict(self.cfg),
            "seed": self.seed,
            "average": None if self.average is None else self.average.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; ``start`` then continues from its version.

        The app may have replaced ``history`` (with its own, non-list history) and ``config``
        (with the whole ExperimentConfig dict) before saving: both are tolerated.
        """
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"server state format {state.get('format')!r} is not {STATE_FORMAT}; "
                "this checkpoint was written by another fedserve version"
            )
        saved = state.get("config") or {}
        if isinstance(saved.get("strategy"), dict):  # the app stored the whole ExperimentConfig
            saved = saved["strategy"]
        for key in ("mode", "optimizer", "aggregation"):
            if key in saved and saved[key] != getattr(self.cfg, key):
                raise ValueError(
                    f"checkpoint has strategy.{key}={saved[key]!r}, the config says "
                    f"{getattr(self.cfg, key)!r}; resume with the same strategy"
                )
        self.set_arrays(state["arrays"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])
        self.round = int(state["round"])
        self.sampler.load_state_dict(state["sampler"])
        self.eval_sampler.load_state_dict(state["eval_sampler"])
        history = state.get("history")
        self.history = [dict(e) for e in history] if isinstance(history, list) else []
        self.counters = Counter(state.get("counters", {}))
        self.seed = int(state.get("seed", self.seed))
        if self.average is not None:
            if state.get("average") is None:
                raise ValueError(
                    "checkpoint has no parameter average but strategy.ema_decay="
                    f"{self.cfg.ema_decay}; resume with the run's strategy.ema_decay"
                )
            self.average.load_state_dict(state["average"])

    # ------------------------------------------------------- Strategy (batch)
    def summary(self) -> None:
        log_summary(self.cfg, self.seed)

    def ensure_partitions(
        self, grid: Grid, timeout: float | None = None, config: ConfigRecord | None = None
    ) -> None:
        """Discover ``{partition-id: node-id}`` by a query message (carrying ``config``) unless
        already known."""
        if self.sampler.node_of:
            return
        messenger = Messenger(grid, self.poll_interval, self.clock, self.sleep)
        wait = self.cfg.round_timeout_s if timeout is None else timeout
        node_of = discover_partitions(
            messenger, min_nodes=self.min_nodes, timeout=wait, config=config
        )
        self.sampler.set_nodes(node_of)
        self.eval_sampler.set_nodes(node_of)

    def train_messages(
        self, partitions: Iterable[int], server_round: int, config: ConfigRecord | None, ttl: float
    ) -> list[Message]:
        return self._messages(MessageType.TRAIN, "delta", partitions, server_round, config, ttl)

    def evaluate_messages(
        self, partitions: Iterable[int], server_round: int, config: ConfigRecord | None, ttl: float
    ) -> list[Message]:
        return self._messages(MessageType.EVALUATE, None, partitions, server_round, config, ttl)

    def _messages(
        self,
        kind: str,
        reply: str | None,
        partitions: Iterable[int],
        server_round: int,
        config: ConfigRecord | None,
        ttl: float,
    ) -> list[Message]:
        """One message per partition carrying the global arrays and the round's config."""
        config = make_config(config, server_round=server_round, version=self.version, reply=reply)
        content = RecordDict({"arrays": self.array_record(), "config": config})
        node_of = (self.sampler if kind == MessageType.TRAIN else self.eval_sampler).node_of
        return [
            Message(content, node_of[p], kind, ttl=ttl, group_id=str(server_round))
            for p in partitions
        ]

    # ------------------------------------------------------------ the update
    def fold_reply(self, reply: Message, *, start_version: int, staleness: int) -> bool:
        """Validate and fold one train reply with weight ``num-examples · s(staleness)``."""
        agg = self.aggregator
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            agg.reject("error", node_id, str(reply.error.reason))
            return False
        valid = agg.validate(reply.content, node_id)
        if valid is None:
            return False
        reported = valid.metrics.get("version")
        if reported is not None and int(reported) != start_version:  # type: ignore[call-overload]
            agg.reject(
                "version",
                node_id,
                f"reply says it started from version {reported}, it was sent {start_version}",
            )
            return False
        weight = self.staleness.weight(staleness) if self.cfg.mode == "async" else 1.0
        agg.fold(valid, weight)
        return True

    def apply_update(self) -> float:
        """``x ← opt(x, -Δ)`` from the aggregator; bumps the version; returns ‖u‖₂."""
        assert self.arrays is not None
        mean_delta = self.aggregator.mean_delta()
        self.arrays = self.optimizer.step(self.arrays, mean_delta)
        if self.average is not None:
            self.average.update(self.arrays)
        self.version += 1
        self._record = None
        return self.optimizer.last_update_norm

    def publish(self, ctx: RunContext, *, dropped: int = 0, timed_out: int = 0) -> None:
        """After an accepted aggregate: update, then evaluate, record history, call
        ``on_version`` (inline, or on the announcer's thread with ``publish_in_background``)."""
        publish_version(self, ctx, dropped=dropped, timed_out=timed_out)

    # ----------------------------------------------------------------- start
    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        on_version: Callable[[VersionEvent], bool | None] | None = None,
        resume_state: dict[str, Any] | None = None,
    ) -> Result:
        """Run until the global version reaches ``num_rounds`` (a total, also when resuming).

        Sync mode makes one version per round; async mode one per ``buffer_size`` accepted
        replies. ``timeout`` caps every wait (per round in sync, per reply in async, together
        with ``strategy.round_timeout_s``: the smaller wins) and is the messages' TTL.
        ``resume_state`` (or an earlier :meth:`load_state_dict`) continues a run: the global
        arrays come from the state and ``initial_arrays`` is ignored.
        ``evaluate_fn(version, arrays)`` runs for version 0 (fresh runs only) and after every
        version; ``on_version`` runs after every version, when the server state is complete, so
        ``save_checkpoint(path, strategy.state_dict())`` there is a consistent checkpoint.
        ``on_version`` returning ``True`` (the bool) stops the run after that version (early stop
        at a target accuracy); async mode then drains the replies in flight as at a normal end.
        With ``strategy.publish_in_background`` both run on a worker thread, in version order,
        while the clients train on; ``start`` returns once every made version was announced. An
        early stop then takes effect at the loop's next check: the versions made meanwhile (at
        most two) are kept and announced too.
        """
        if resume_state is not None:
            self.load_state_dict(resume_state)
        elif self.arrays is None:
            self.set_arrays(initial_arrays)
        log.info(
            "Starting ParameterServer from version %d to %d (%s)",
            self.version,
            num_rounds,
            self.cfg.mode,
        )
        self.summary()
        wait = float(min(timeout, self.cfg.round_timeout_s))
        now = self.clock()
        ctx = RunContext(
            messenger=Messenger(grid, self.poll_interval, self.clock, self.sleep),
            num_rounds=int(num_rounds),
            timeout=wait,
            train_config=train_config if train_config is not None else ConfigRecord(),
            evaluate_config=evaluate_config if evaluate_config is not None else ConfigRecord(),
            evaluate_fn=evaluate_fn,
            on_version=on_version,
            result=Result(),
            started=now,
            last_version_at=now,
            announcer=VersionAnnouncer() if self.cfg.publish_in_background else None,
        )
        if evaluate_fn is not None and self.version == 0:
            initial = evaluate_fn(0, self.array_record())
            if initial is not None:
                ctx.result.evaluate_metrics_serverapp[0] = initial
                log.info("initial global evaluation: %s", dict(initial))
        try:
            if self.version < num_rounds:
                self.ensure_partitions(grid, wait)
                if self.cfg.mode == "sync":
                    run_sync(self, ctx)
                else:
                    run_async(self, ctx)
        finally:
            if ctx.announcer is not None:
                ctx.announcer.close()  # every made version announced (checkpointed) first
        ctx.result.arrays = self.published_record()
        log.info(
            "ParameterServer finished at version %d%s in %.1fs; totals %s",
            self.version,
            " (stopped early by on_version)" if ctx.stop_requested else "",
            self.clock() - ctx.started,
            dict(self.counters),
        )
        return ctx.result
