"""``mode: async``: FedBuff (Nguyen et al. 2022), buffered asynchronous aggregation.

``concurrency`` clients are kept busy. Each reply to a model of version ``v_start`` that arrives
at server version ``v`` has staleness ``τ = v - v_start``; with ``τ > max_staleness`` it is
dropped and counted, otherwise it is validated and folded with weight ``num-examples · s(τ)``,
``s(τ) = 1/√(1+τ)``. Every ``buffer_size`` accepted replies the server optimizer makes a new
version. Whenever a client replies (or times out) a slot frees up and the next idle partition,
drawn by the seeded sampler (``selection``: uniform, or balanced: among the idle partitions sent
the fewest models), is sent the newest model at once.

The loop ends when the version reaches ``num_rounds`` (versions, not rounds) or the version sink
asked to stop (early stop, e.g. a target accuracy). The replies still in flight are then pulled
and discarded for at most ``drain_timeout`` seconds (bounded by their own
deadlines); the rest expire by their TTL. A partially filled buffer is discarded.

Replies within one pull are handled in partition-id order, so a given arrival schedule always gives
the same result; a resumed async run is not bit-identical to an uninterrupted one (the replies in
flight at the checkpoint are lost), a resumed sync run is.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from server.strategy.cohort import train_messages
from server.strategy.messaging import expired
from server.strategy.run import RunContext
from server.strategy.state import ServerState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dispatch:
    partition: int
    node_id: int
    start_version: int
    deadline: float


def run_async(state: ServerState, ctx: RunContext, drain_timeout: float) -> None:
    """Make versions from buffers of ``buffer_size`` accepted replies until ``ctx`` says the run
    is finished; then drain the replies in flight for at most ``drain_timeout`` seconds."""
    cfg = state.cfg
    if cfg.fraction_evaluate > 0:
        log.warning("strategy.fraction_evaluate is ignored in async mode (clients stay busy)")
    num_partitions = len(state.sampler.node_of)
    concurrency = min(cfg.concurrency, num_partitions)
    if concurrency < cfg.concurrency:
        log.info(
            "strategy.concurrency=%d > %d partitions: keeping %d busy",
            cfg.concurrency,
            num_partitions,
            concurrency,
        )
    messenger = ctx.messenger
    agg = state.aggregator
    agg.reset()
    in_flight: dict[str, Dispatch] = {}
    window: Counter[str] = Counter()  # dropped / timed out since the last version
    while not ctx.finished(state.version):
        refused = _fill(state, ctx, in_flight, concurrency)
        if not in_flight:
            raise RuntimeError(
                "async mode: no client could be sent work (every push was refused by the grid)"
            )
        replies = [
            r for r in messenger.pull(in_flight) if r.metadata.reply_to_message_id in in_flight
        ]
        replies.sort(key=lambda m: in_flight[m.metadata.reply_to_message_id].partition)
        for reply in replies:
            dispatch = in_flight.pop(reply.metadata.reply_to_message_id)
            if ctx.finished(state.version):
                state.counters["discarded"] += 1
                continue
            if expired(reply):  # the TTL (its deadline) ran out: Flower's "Message Unavailable"
                window["timed_out"] += 1
                _log_timeout(dispatch, ctx.timeout)
                continue
            staleness = state.staleness.staleness(state.version, dispatch.start_version)
            if not reply.has_error() and not state.staleness.accepts(staleness):
                window["dropped"] += 1
                log.info(
                    "dropped reply from node %d (partition %d): staleness %d > max_staleness %d",
                    dispatch.node_id,
                    dispatch.partition,
                    staleness,
                    cfg.max_staleness,
                )
                continue
            state.fold(reply, start_version=dispatch.start_version, staleness=staleness)
            if agg.num_accepted >= cfg.buffer_size:
                state.round = state.version + 1
                ctx.make_version(state, dropped=window["dropped"], timed_out=window["timed_out"])
                window.clear()
        now = messenger.clock()
        for message_id in [i for i, d in in_flight.items() if now >= d.deadline]:
            window["timed_out"] += 1
            _log_timeout(in_flight.pop(message_id), ctx.timeout)
        if not replies and not ctx.finished(state.version) or refused:
            messenger.wait()
    _drain(state, ctx, in_flight, drain_timeout)


def _log_timeout(dispatch: Dispatch, timeout: float) -> None:
    log.warning(
        "node %d (partition %d) did not reply within %.1fs; giving its slot to another",
        dispatch.node_id,
        dispatch.partition,
        timeout,
    )


def _fill(
    state: ServerState, ctx: RunContext, in_flight: dict[str, Dispatch], concurrency: int
) -> int:
    """Send the newest model to idle partitions until ``concurrency`` are busy; # refused."""
    busy = {d.partition for d in in_flight.values()}
    chosen: list[int] = []
    while len(busy) < concurrency:
        partition = state.sampler.pick(busy, balanced=state.cfg.selection == "balanced")
        if partition is None:
            break
        busy.add(partition)
        chosen.append(partition)
    if not chosen:
        return 0
    server_round = state.version + 1
    messages = train_messages(state, chosen, server_round, ctx.train_config, ctx.timeout)
    ids = ctx.messenger.push(messages)
    deadline = ctx.messenger.clock() + ctx.timeout
    refused = 0
    for message_id, partition in zip(ids, chosen, strict=True):
        node_id = state.sampler.node_of[partition]
        if message_id is None:
            refused += 1
            state.aggregator.reject("error", node_id, "push refused")
            continue
        in_flight[message_id] = Dispatch(partition, node_id, state.version, deadline)
    return refused


def _drain(
    state: ServerState, ctx: RunContext, in_flight: dict[str, Dispatch], drain_timeout: float
) -> None:
    if not in_flight:
        return
    messenger = ctx.messenger
    latest = max(d.deadline for d in in_flight.values())
    deadline = min(messenger.clock() + drain_timeout, latest)
    waiting = len(in_flight)
    discarded = 0
    for reply in messenger.collect(in_flight, deadline):  # type: ignore[arg-type]
        in_flight.pop(reply.metadata.reply_to_message_id)
        discarded += 1
    state.counters["discarded"] += discarded
    log.info(
        "after the last version: discarded %d of %d in-flight replies; %d left to expire",
        discarded,
        waiting,
        len(in_flight),
    )
