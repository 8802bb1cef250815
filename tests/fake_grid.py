"""A scripted, in-memory Flower Grid on a virtual clock, for strategy tests.

Each node holds one partition. A pushed message gets an id and a due time
``clock.now + latency(partition, dispatch_index, message)`` (``math.inf``: never answered); a
``pull_messages`` at or after the due time returns the reply once, computed by
``client_fn(message, partition)`` (a RecordDict, or a flwr ``Error`` for an error reply). Query
messages are answered at once with ``MetricRecord({"partition-id": p})``. As Flower's SuperLink
does, a message whose TTL runs out before its reply is due is answered once with an error reply
of code ``MESSAGE_UNAVAILABLE`` ("Message Unavailable"). ``VirtualClock.sleep`` only advances the
clock, so timeouts cost no wall time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import count

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

ClientFn = Callable[[Message, int], RecordDict | Error]
LatencyFn = Callable[[int, int, Message], float]


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(float(seconds), 1e-3)


@dataclass
class Sent:
    message: Message
    partition: int
    due: float
    dispatch_index: int
    expires: float = math.inf


@dataclass
class FakeGrid(Grid):
    partition_of: dict[int, int]
    client_fn: ClientFn
    clock: VirtualClock = field(default_factory=VirtualClock)
    latency: LatencyFn = lambda partition, index, message: 1.0
    pending: dict[str, Sent] = field(default_factory=dict)
    log: list[Sent] = field(default_factory=list)
    dispatches: dict[int, int] = field(default_factory=dict)
    #: node id -> how many of its next partition queries reply an error (a crashed actor)
    query_errors: dict[int, int] = field(default_factory=dict)
    _ids: Iterable[int] = field(default_factory=count)

    def set_run(self, run) -> None:  # type: ignore[no-untyped-def]
        self._run = run

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return getattr(self, "_run", None)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.partition_of)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for message in messages:
            message_id = f"msg-{next(self._ids)}"  # type: ignore[call-overload]
            message.metadata.__dict__["_message_id"] = message_id
            partition = self.partition_of[message.metadata.dst_node_id]
            if message.metadata.message_type == MessageType.QUERY:
                due, index = self.clock.now, -1
            else:
                index = self.dispatches.get(partition, 0)
                self.dispatches[partition] = index + 1
                due = self.clock.now + self.latency(partition, index, message)
            ttl = message.metadata.ttl
            expires = self.clock.now + ttl if ttl else math.inf
            sent = Sent(message, partition, due, index, expires)
            self.pending[message_id] = sent
            if index >= 0:
                self.log.append(sent)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        replies = []
        for message_id in list(message_ids):
            sent = self.pending.get(message_id)
            if sent is None:
                continue
            message = sent.message
            if sent.due > sent.expires and self.clock.now >= sent.expires:
                del self.pending[message_id]  # Flower: the TTL ran out before any reply
                error = Error(ErrorCode.MESSAGE_UNAVAILABLE, "Error: Message Unavailable")
                replies.append(Message(error, reply_to=message))
                continue
            if sent.due > self.clock.now:
                continue
            del self.pending[message_id]
            if message.metadata.message_type == MessageType.QUERY:
                node = message.metadata.dst_node_id
                if self.query_errors.get(node, 0) > 0:
                    self.query_errors[node] -= 1
                    replies.append(Message(Error(1, "actor unavailable"), reply_to=message))
                    continue
                content = RecordDict({"metrics": MetricRecord({"partition-id": sent.partition})})
                replies.append(Message(content, reply_to=message))
                continue
            result = self.client_fn(message, sent.partition)
            if isinstance(result, Error):
                replies.append(Message(result, reply_to=message))
            else:
                replies.append(Message(result, reply_to=message))
        return replies

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        ids = set(self.push_messages(messages))
        end = self.clock.now + (timeout if timeout is not None else math.inf)
        out: list[Message] = []
        while ids and self.clock.now <= end:
            got = self.pull_messages(ids)
            out.extend(got)
            ids -= {m.metadata.reply_to_message_id for m in got}
            if ids:
                self.clock.sleep(0.1)
        return out


def delta_reply(
    deltas: dict[str, np.ndarray], num_examples: int | None, version: int, partition: int, **extra
) -> RecordDict:
    """A train reply as the ClientApp sends it (``num_examples=None`` leaves the key out)."""
    metrics: dict[str, int | float] = {"train-loss": 1.0 + partition, "version": version}
    metrics["partition-id"] = partition
    if num_examples is not None:
        metrics["num-examples"] = num_examples
    metrics.update(extra)
    return RecordDict(
        {
            "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in deltas.items()}),
            "metrics": MetricRecord(metrics),
        }
    )


def received(message: Message) -> tuple[dict[str, np.ndarray], int, int]:
    """The arrays, ``version`` and ``server-round`` a train message carries."""
    arrays = {k: v.numpy() for k, v in message.content["arrays"].items()}
    config = message.content["config"]
    return arrays, int(config["version"]), int(config["server-round"])


def deterministic_delta(
    params: dict[str, np.ndarray], partition: int, server_round: int
) -> dict[str, np.ndarray]:
    """A fake local update, a pure function of (params, partition, round)."""
    out = {}
    for i, (key, value) in enumerate(params.items()):
        if np.issubdtype(value.dtype, np.floating):
            phase = np.sin(np.arange(value.size, dtype=np.float64) + partition + 3 * server_round)
            step = -0.1 * value + 0.05 * (partition + 1 + i) * phase.reshape(value.shape)
            out[key] = step.astype(value.dtype)
        else:
            out[key] = np.full(value.shape, 3 + partition % 2, dtype=value.dtype)
    return out


def deterministic_client(message: Message, partition: int) -> RecordDict:
    params, version, server_round = received(message)
    deltas = deterministic_delta(params, partition, server_round)
    return delta_reply(deltas, 10 + 3 * partition, version, partition)


def small_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.standard_normal((4, 3)).astype(np.float32),
        "b": rng.standard_normal(3).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }
