"""Partition discovery: a node whose query fails is asked again; one that fails twice is left out
and the run goes on with the others; two nodes claiming one partition: the lower id keeps it."""

from __future__ import annotations

import logging
import math

import pytest
from fake_grid import small_model
from flwr.app import MessageType
from test_parameter_server import make

from server.strategy.messaging import to_array_record

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def test_a_node_that_fails_the_query_once_is_asked_again() -> None:
    server, grid = make(4)
    grid.query_errors = {2002: 1}
    server.ensure_partitions(grid, timeout=10)
    assert server.state.sampler.node_of == {0: 1001, 1: 2002, 2: 3003, 3: 4004}
    assert grid.query_errors == {2002: 0}


def test_a_node_that_fails_twice_is_left_out_and_the_run_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, grid = make(4)
    grid.query_errors = {3003: 2}
    with caplog.at_level(logging.WARNING):
        server.start(grid, to_array_record(small_model()), num_rounds=2)
    assert server.state.sampler.node_of == {0: 1001, 1: 2002, 3: 4004}
    assert server.state.version == 2 and {s.partition for s in grid.log} == {0, 1, 3}
    assert "node 3003 failed the partition query twice" in caplog.text


def test_two_nodes_claiming_one_partition_the_lower_id_keeps_it() -> None:
    server, grid = make(3)
    grid.partition_of[9009] = 1  # a second node with partition 1
    server.ensure_partitions(grid, timeout=10)
    assert server.state.sampler.node_of == {0: 1001, 1: 2002, 2: 3003}


def test_discovery_has_its_own_timeout_not_the_round_deadline() -> None:
    """Clients load their data before they answer the query (here 30 s): a 5 s round deadline
    must not fail start-up; discovery waits strategy.discovery_timeout_s."""
    server, grid = make(3, round_timeout_s=5.0, discovery_timeout_s=60.0)
    _slow_queries(grid, 30.0)
    server.start(grid, to_array_record(small_model()), num_rounds=1)
    assert server.state.sampler.node_of == {0: 1001, 1: 2002, 2: 3003}
    assert server.state.version == 1


def test_a_discovery_timeout_says_so_and_what_to_raise() -> None:
    server, grid = make(3, discovery_timeout_s=10.0)
    _slow_queries(grid, math.inf)
    with pytest.raises(RuntimeError) as failed:
        server.ensure_partitions(grid)
    message = str(failed.value)
    assert "within strategy.discovery_timeout_s=10s (3 timed out" in message
    assert "raise strategy.discovery_timeout_s" in message and "@app.query" not in message


def _slow_queries(grid, seconds: float) -> None:  # type: ignore[no-untyped-def]
    """Partition queries are answered ``seconds`` after they are sent (data loading)."""
    push = grid.push_messages

    def delayed(messages):  # type: ignore[no-untyped-def]
        ids = push(messages)
        for message_id in ids:
            sent = grid.pending[message_id]
            if sent.message.metadata.message_type == MessageType.QUERY:
                sent.due = grid.clock.now + seconds
        return ids

    grid.push_messages = delayed
