"""The messages a cohort is sent: the global arrays of the state and the round's config.

Train message content (the team contract)::

    RecordDict({"arrays": ArrayRecord(global arrays),
                "config": ConfigRecord({"server-round": int, "version": int, "reply": "delta",
                                        **train_config})})

Evaluate messages carry the same arrays (the server's own, never the published average) and
config without ``reply``. Partitions are mapped to nodes by the train or the eval sampler.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from server.strategy.messaging import make_config
from server.strategy.sampling import PartitionSampler
from server.strategy.state import ServerState


def train_messages(
    state: ServerState,
    partitions: Iterable[int],
    server_round: int,
    config: ConfigRecord | None,
    ttl: float,
) -> list[Message]:
    """One train message per partition, asking for a delta."""
    return _messages(
        state, state.sampler, MessageType.TRAIN, "delta", partitions, server_round, config, ttl
    )


def evaluate_messages(
    state: ServerState,
    partitions: Iterable[int],
    server_round: int,
    config: ConfigRecord | None,
    ttl: float,
) -> list[Message]:
    """One evaluate message per partition (of the eval sampler)."""
    return _messages(
        state, state.eval_sampler, MessageType.EVALUATE, None, partitions, server_round, config, ttl
    )


def _messages(
    state: ServerState,
    sampler: PartitionSampler,
    kind: str,
    reply: str | None,
    partitions: Iterable[int],
    server_round: int,
    config: ConfigRecord | None,
    ttl: float,
) -> list[Message]:
    config = make_config(config, server_round=server_round, version=state.version, reply=reply)
    content = RecordDict({"arrays": state.array_record(), "config": config})
    return [
        Message(content, sampler.node_of[p], kind, ttl=ttl, group_id=str(server_round))
        for p in partitions
    ]
