"""Message plumbing shared by the sync and async loops: contents, pushing, polling, discovery.

Train message content (the team contract)::

    RecordDict({"arrays": ArrayRecord(global arrays),
                "config": ConfigRecord({"server-round": int, "version": int, "reply": "delta",
                                        **train_config})})

Query message (partition discovery) content: ``RecordDict({"config": ConfigRecord({"request":
"partition-id", **train_config})})``; the ClientApp's ``@app.query()`` handler replies any
MetricRecord (or ConfigRecord) holding ``"partition-id": int`` (ours loads its partition first
when the config carries the ``task``).

Every message's TTL is the wait it belongs to (a round's deadline, a reply's in async mode, the
discovery timeout). When it runs out before the node replied, Flower's SuperLink answers the pull
with an error reply of its own ("Message Unavailable", :data:`EXPIRED_CODES`): that is a timeout,
not a client error, and :func:`expired` tells the two apart.

Polling: a pull asks about every pending message id (flwr's ``get_message_res`` validates each),
so pulling right after every reply costs O(cohort^2) a round (seconds of server CPU at 1,000
clients). Flower's grid sleeps a fixed ``pull_interval`` (0.1 s) after every pull; ours sleeps
:data:`PULL_COST_FACTOR` times as long as the last pull took, between :data:`MIN_POLL_S` and
``poll_interval``: pulls cost at most ~1/20 of the server's time however many are pending, and a
small cohort's last reply is seen within ~10 ms instead of up to 100 ms (with 10 clients, ~0.1 s
of a ~0.9 s round went to that wait: ``benchmarks/scale``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

Clock = Callable[[], float]
Sleep = Callable[[float], None]

#: the shortest wait between two pulls (seconds)
MIN_POLL_S = 0.01
#: a wait between two pulls lasts this many times the last pull
PULL_COST_FACTOR = 20.0
#: the SuperLink's replies for a message (or a reply) whose TTL ran out
EXPIRED_CODES = frozenset({ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE})


def expired(reply: Message) -> bool:
    """True for the runtime's stand-in reply to a message that expired unanswered (a timeout)."""
    return reply.has_error() and reply.error.code in EXPIRED_CODES


def to_array_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.asarray(value)) for key, value in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Writable numpy copies, in the record's key order."""
    return {key: np.array(item.numpy(), copy=True) for key, item in record.items()}


def make_config(
    base: ConfigRecord | None, *, server_round: int, version: int, reply: str | None
) -> ConfigRecord:
    config = ConfigRecord(dict(base.items()) if base is not None else {})
    config["server-round"] = int(server_round)
    config["version"] = int(version)
    if reply is not None:
        config["reply"] = reply
    return config


@dataclass
class Messenger:
    """Push messages to nodes and poll for their replies with a short sleep (at most
    ``poll_interval``; see the module docstring)."""

    grid: Grid
    poll_interval: float = 0.1
    clock: Clock = time.monotonic
    sleep: Sleep = time.sleep
    #: seconds the last pull took
    last_pull_s: float = 0.0

    def push(self, messages: list[Message]) -> list[str | None]:
        """Message ids in the order of ``messages``; None where the runtime refused one."""
        if not messages:
            return []
        ids = list(self.grid.push_messages(messages))
        if len(ids) != len(messages):
            log.warning("pushed %d messages, the grid returned %d ids", len(messages), len(ids))
            ids = ids + [None] * (len(messages) - len(ids))
        refused = sum(1 for i in ids if not i)
        if refused:
            log.warning("the grid refused %d of %d messages", refused, len(messages))
        return [str(i) if i else None for i in ids]

    def pull(self, message_ids: Iterable[str]) -> list[Message]:
        ids = list(message_ids)
        if not ids:
            return []
        started = self.clock()
        replies = list(self.grid.pull_messages(ids))
        self.last_pull_s = self.clock() - started
        return replies

    def wait(self) -> None:
        """Sleep before the next pull: long enough that pulls cost ~1/20 of the time."""
        wanted = max(MIN_POLL_S, PULL_COST_FACTOR * self.last_pull_s)
        self.sleep(min(self.poll_interval, wanted))

    def collect(self, pending: dict[str, object], deadline: float) -> Iterable[Message]:
        """Yield replies to ``pending`` ids as they arrive until all came or ``deadline``.

        Replies are removed from ``pending``; each pull's batch is yielded in message-id-free,
        deterministic order (by source node id).
        """
        while pending:
            replies = self.pull(pending)
            replies = [r for r in replies if r.metadata.reply_to_message_id in pending]
            replies.sort(key=lambda m: (m.metadata.src_node_id, m.metadata.reply_to_message_id))
            yield from replies
            if not pending or self.clock() >= deadline:
                return
            # a wait after every pull, even while replies stream in (see the module docstring)
            self.wait()


def find_partition_id(content: RecordDict) -> int | None:
    for record in (*content.metric_records.values(), *content.config_records.values()):
        value = record.get("partition-id")
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    return None


def discover_partitions(
    messenger: Messenger,
    *,
    min_nodes: int,
    timeout: float,
    config: ConfigRecord | None = None,
) -> dict[int, int]:
    """Ask every connected node for its partition id; return ``{partition-id: node-id}``.

    ``timeout`` (``strategy.discovery_timeout_s``) bounds the wait for ``min_nodes`` nodes to
    connect and, separately, each query (its TTL). A node whose query fails (an error reply:
    e.g. a simulation actor that crashed and was restarted) is asked once more; one that fails
    again, or does not answer in time, is left out with a warning, and the run goes on without
    its partition. Two nodes claiming one partition: the lower node id keeps it. ``config``
    (e.g. the train config with its ``task``) goes along, so that a client can get ready to
    train (load its data) before it answers. No usable answer at all raises RuntimeError naming
    what happened (timeouts, errors, or answers without a partition id).
    """
    deadline = messenger.clock() + timeout
    while True:
        node_ids = sorted(int(n) for n in messenger.grid.get_node_ids())
        if len(node_ids) >= min_nodes:
            break
        if messenger.clock() >= deadline:
            raise RuntimeError(
                f"only {len(node_ids)} node(s) connected after {timeout:.0f}s, need "
                f"{min_nodes} (num_clients); start more SuperNodes or lower num_clients"
            )
        log.info("waiting for nodes: %d connected, need %d", len(node_ids), min_nodes)
        messenger.sleep(max(messenger.poll_interval, 0.5))
    first = _query_partitions(messenger, node_ids, timeout, config)
    answers, outcome = first.answers, first
    if first.failed:
        log.warning(
            "asking the %d node(s) that failed the partition query again",
            len(first.failed),
        )
        outcome = _query_partitions(messenger, first.failed, timeout, config)
        answers.update(outcome.answers)
    for node_id in outcome.failed:
        log.warning("node %d failed the partition query twice; its partition is left out", node_id)
    node_of: dict[int, int] = {}
    for node_id, partition in sorted(answers.items()):
        if partition in node_of:
            log.warning(
                "nodes %d and %d both hold partition %d; using node %d",
                node_of[partition],
                node_id,
                partition,
                node_of[partition],
            )
            continue
        node_of[partition] = node_id
    if not node_of:
        raise RuntimeError(_no_answer(first, outcome, len(node_ids), timeout))
    log.info("discovered %d partitions on %d nodes", len(node_of), len(node_ids))
    return node_of


@dataclass
class _QueryOutcome:
    answers: dict[int, int]  # node id -> partition id
    failed: list[int]  # nodes whose reply was an error
    timed_out: int
    unlabelled: int  # answers without a partition id
    first_error: str = ""


def _no_answer(first: _QueryOutcome, last: _QueryOutcome, nodes: int, timeout: float) -> str:
    """Why discovery found no partition, in one line with what to do."""
    if first.unlabelled or last.unlabelled:
        return (
            "no node answered the partition-id query with a partition id; the ClientApp must "
            "register an @app.query() handler replying MetricRecord({'partition-id': int})"
        )
    if last.failed:
        return (
            f"every node failed the partition-id query (twice), e.g.: {last.first_error}; "
            "see the clients' log"
        )
    timed_out = first.timed_out + (last.timed_out if last is not first else 0)
    return (
        f"none of the {nodes} node(s) answered the partition-id query within "
        f"strategy.discovery_timeout_s={timeout:g}s ({timed_out} timed out; each client loads "
        "its data before it answers): raise strategy.discovery_timeout_s"
    )


def _query_partitions(
    messenger: Messenger, node_ids: list[int], timeout: float, config: ConfigRecord | None
) -> _QueryOutcome:
    """One partition query to ``node_ids``, with TTL and wait ``timeout``."""
    deadline = messenger.clock() + timeout
    content = RecordDict({"config": ConfigRecord({**(config or {}), "request": "partition-id"})})
    messages = [
        Message(content, node_id, MessageType.QUERY, ttl=timeout, group_id="partition-query")
        for node_id in node_ids
    ]
    ids = messenger.push(messages)
    pending: dict[str, object] = {i: n for i, n in zip(ids, node_ids, strict=True) if i}
    outcome = _QueryOutcome(answers={}, failed=[], timed_out=0, unlabelled=0)
    for reply in messenger.collect(pending, deadline):
        node_id = int(pending.pop(reply.metadata.reply_to_message_id))  # type: ignore[arg-type]
        if expired(reply):
            outcome.timed_out += 1
            continue
        if reply.has_error():
            log.warning("node %d failed the partition query: %s", node_id, reply.error.reason)
            outcome.failed.append(node_id)
            outcome.first_error = outcome.first_error or str(reply.error.reason)
            continue
        partition = find_partition_id(reply.content)
        if partition is None:
            log.warning("node %d answered the partition query without 'partition-id'", node_id)
            outcome.unlabelled += 1
            continue
        outcome.answers[node_id] = partition
    outcome.timed_out += len(pending)
    if outcome.timed_out:
        log.warning(
            "%d node(s) did not answer the partition query within %gs",
            outcome.timed_out,
            timeout,
        )
    outcome.failed.sort()
    return outcome
