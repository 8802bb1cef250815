"""Flower's built-in FedAvg on full weights: the reference for benchmarks and parity tests.

It feeds the same version sink as the ParameterServer, with events of its own: one per round,
made in Flower's central-evaluation hook (the last step of a round, after every reply came), with
no state snapshot (Flower's strategy keeps none to resume, so nothing is checkpointed).

Flower's FedAvg averages whatever it is sent; here every round's replies are screened first, as
the ParameterServer screens them: validated (:mod:`server.strategy.validation`: shapes, dtypes,
finite values, ``num-examples``) and, with ``strategy.max_norm_ratio`` (the default), judged by
the norm of their update ``w_i - x`` (:mod:`server.strategy.norm_filter`; Flower hands the round's
replies over at once, so the window holds the whole round before any is judged). Honest replies
pass unchanged, so the reference stays Flower's own FedAvg.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from server.config import ExperimentConfig
from server.strategy.events import VersionEvent
from server.strategy.messaging import from_array_record, to_array_record
from server.strategy.norm_filter import NormFilter
from server.strategy.sink import VersionSink
from server.strategy.validation import InvalidReply, specs_of, validate_reply

log = logging.getLogger(__name__)


def run_flower_fedavg(
    grid: Grid,
    cfg: ExperimentConfig,
    initial: dict[str, np.ndarray],
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    sink: VersionSink,
) -> dict[str, np.ndarray]:
    """Run ``cfg.rounds`` rounds of Flower's FedAvg (or until ``sink`` asks to stop); returns
    the last global arrays."""
    nodes = max(1, min(cfg.num_clients, round(cfg.strategy.fraction_train * cfg.num_clients)))
    strategy = _RecordingFedAvg(
        fraction_train=cfg.strategy.fraction_train,
        fraction_evaluate=cfg.strategy.fraction_evaluate,
        min_train_nodes=nodes,
        min_evaluate_nodes=0,
        min_available_nodes=cfg.num_clients,
    )
    ratio = cfg.strategy.max_norm_ratio
    strategy.norm_filter = NormFilter(ratio) if ratio is not None else None
    strategy.global_arrays = dict(initial)
    train_config = ConfigRecord({**dict(train_config), "reply": "weights"})
    last: dict[str, np.ndarray] = dict(initial)
    last_version_at = time.perf_counter()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        nonlocal last, last_version_at
        if server_round == 0:
            return None
        now = time.perf_counter()
        previous, last = last, from_array_record(arrays)
        strategy.global_arrays = last
        event = VersionEvent(
            version=server_round,
            round=server_round,
            arrays=last,
            train_metrics=strategy.last_train_metrics,
            client_eval_metrics=None,
            num_accepted=strategy.last_accepted,
            rejected_by_reason=dict(strategy.last_rejected),
            num_dropped=0,
            num_timed_out=0,
            update_norm=_update_norm(previous, last),
            seconds=now - last_version_at,
            made_at=time.time(),
            state=None,
        )
        stop = sink.accept(event) is True
        last_version_at = time.perf_counter()  # as before: the sink's time is not the next round's
        if stop:
            raise _StopRun(server_round)
        return None

    try:
        strategy.start(
            grid,
            to_array_record(initial),
            num_rounds=cfg.rounds,
            timeout=cfg.strategy.round_timeout_s,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )
    except _StopRun as stop:
        # Flower's Strategy.start has no stop hook. Central evaluation is the last step of a
        # round, after every train/evaluate reply was received: nothing is in flight here.
        log.info("flower_fedavg stopped after round %d (stop_at_accuracy)", stop.round)
    return last


def _update_norm(old: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> float:
    """‖new - old‖₂ over the floating arrays (as the ParameterServer's update norm)."""
    squares = sum(
        float(np.sum((value.astype(np.float64) - old[key]) ** 2))
        for key, value in new.items()
        if np.issubdtype(value.dtype, np.floating)
    )
    return math.sqrt(squares)


class _StopRun(Exception):
    """Raised from Flower FedAvg's ``evaluate_fn`` to end ``start`` after a round."""

    def __init__(self, server_round: int) -> None:
        super().__init__(f"stop after round {server_round}")
        self.round = server_round


class _RecordingFedAvg(FedAvg):
    """Flower's FedAvg on screened replies, keeping the last round's aggregated client metrics
    and reply counts. ``global_arrays`` are the arrays the round's clients were sent."""

    last_train_metrics: MetricRecord = MetricRecord()
    last_accepted: int = 0
    last_rejected: dict[str, int] = {}
    global_arrays: dict[str, np.ndarray] = {}
    norm_filter: NormFilter | None = None

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted, rejected = self._screen(list(replies))
        arrays, metrics = super().aggregate_train(server_round, accepted)
        self.last_train_metrics = metrics if metrics is not None else MetricRecord()
        self.last_accepted = len(accepted)
        self.last_rejected = dict(rejected)
        return arrays, metrics

    def _screen(self, replies: list[Message]) -> tuple[list[Message], Counter[str]]:
        """The replies that pass validation and the norm filter; the others counted by reason
        and logged with their node id."""
        rejected: Counter[str] = Counter()

        def reject(reply: Message, reason: str, detail: str) -> None:
            rejected[reason] += 1
            node = reply.metadata.src_node_id
            log.warning("rejected reply from node %s: %s: %s", node, reason, detail)

        specs = specs_of(self.global_arrays)
        valid: list[tuple[Message, float]] = []
        for reply in replies:
            if reply.has_error():
                reject(reply, "error", str(reply.error.reason))
                continue
            try:
                checked = validate_reply(reply.content, specs)
            except InvalidReply as exc:
                reject(reply, exc.reason, exc.detail)
                continue
            valid.append((reply, _update_norm(self.global_arrays, checked.arrays)))
        if self.norm_filter is None:
            return [reply for reply, _ in valid], rejected
        for _, norm in valid:
            self.norm_filter.record(norm)
        accepted = []
        for reply, norm in valid:
            outlier, median = self.norm_filter.is_outlier(norm)
            if outlier:
                reject(
                    reply,
                    "norm_outlier",
                    f"update norm {norm:.4g} > max_norm_ratio {self.norm_filter.ratio:g} x the "
                    f"median {median:.4g} of the recent update norms",
                )
            else:
                accepted.append(reply)
        return accepted, rejected
