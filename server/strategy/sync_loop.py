"""``mode: sync``: one cohort per round, replies folded as they arrive, one version per round.

Each round samples ``⌈fraction_train · N⌉`` partitions, pushes the global arrays to their nodes
and pulls replies as they arrive, validating and folding each at once, until every node replied or
``min(round_timeout_s, timeout)`` passed (also the messages' TTL: Flower's "Message Unavailable"
answer for an expired one counts as a timeout, not an error). With at least ``min_replies``
accepted replies the server optimizer makes the next version; otherwise the round is retried with
a new cohort, up to ``max_round_retries`` times, then :class:`RoundFailedError` stops the run (the
last good version was already handed to the version sink, i.e. checkpointed by the app). A sink
asking to stop ends the run after that version (nothing is in flight between two sync rounds).
"""

from __future__ import annotations

import logging

from server.strategy.cohort import train_messages
from server.strategy.messaging import expired
from server.strategy.run import RunContext
from server.strategy.state import ServerState

log = logging.getLogger(__name__)


class RoundFailedError(RuntimeError):
    """A sync round got fewer than ``min_replies`` accepted replies in every retry."""


def _advice(timed_out: int, rejected: int) -> str:
    """What to set, after the outcome of the last attempt."""
    if timed_out and timed_out >= rejected:
        return (
            "Clients did not reply in time: raise strategy.round_timeout_s (in a simulation "
            "the clients share one actor per CPU core, so a round takes ~cohort/cores times a "
            "client's time), or lower strategy.min_replies"
        )
    return (
        "Replies were rejected: see the 'rejected reply from node' lines above and the "
        "clients' logs, or lower strategy.min_replies"
    )


def run_sync(state: ServerState, ctx: RunContext) -> None:
    """Make versions, one per round, until ``ctx`` says the run is finished."""
    cfg = state.cfg
    sampler = state.sampler
    size = sampler.cohort_size(cfg.fraction_train)
    if size < cfg.min_replies:
        raise ValueError(
            f"strategy.min_replies={cfg.min_replies} exceeds the cohort size {size} "
            f"(ceil(fraction_train={cfg.fraction_train} x {len(sampler.node_of)} "
            "partitions)); lower min_replies or raise fraction_train"
        )
    while not ctx.finished(state.version):
        server_round = state.round + 1
        timed_out = 0
        attempts = cfg.max_round_retries + 1
        for attempt in range(1, attempts + 1):
            agg = state.aggregator
            agg.reset()
            cohort = sampler.sample(size)
            messages = train_messages(state, cohort, server_round, ctx.train_config, ctx.timeout)
            ids = ctx.messenger.push(messages)
            pending: dict[str, object] = {}
            for message_id, partition in zip(ids, cohort, strict=True):
                if message_id is None:
                    agg.reject("error", sampler.node_of[partition], "push refused")
                else:
                    pending[message_id] = partition
            deadline = ctx.messenger.clock() + ctx.timeout
            late: list[object] = []
            for reply in ctx.messenger.collect(pending, deadline):
                partition = pending.pop(reply.metadata.reply_to_message_id)
                if expired(reply):
                    late.append(partition)
                else:
                    state.fold(reply, start_version=state.version, staleness=0)
            agg.settle()  # the norm filter's warm-up may hold the first replies of a run
            late.extend(pending.values())
            timed_out = len(late)
            if timed_out:
                log.warning(
                    "round %d: %d of %d clients did not reply within %.1fs (partitions %s)",
                    server_round,
                    timed_out,
                    len(cohort),
                    ctx.timeout,
                    sorted(late),  # type: ignore[type-var]
                )
            if agg.num_accepted >= cfg.min_replies:
                break
            state.counters["failed_rounds"] += 1
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
                f"strategy.min_replies={cfg.min_replies} accepted replies each time (the last: "
                f"{agg.num_accepted} accepted, rejected {dict(agg.rejected)}, {timed_out} timed "
                f"out after {ctx.timeout:g}s); the last good global version is "
                f"{state.version}. {_advice(timed_out, agg.num_rejected)}"
            )
        state.round = server_round
        ctx.make_version(state, timed_out=timed_out)
