"""Our ``flwr-simulation`` wrapper: every Simulation Engine worker gets a thread of its own, and
the engine's dispatcher costs one pass over the stored messages per sweep, not one per node."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.task_identity import TaskIdentity
from flwr.superlink.federation import NoOpFederationManager
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from server import simulation_runtime
from server.simulation_runtime import (
    EveryWorkerExecutor,
    deliver_pending,
    patch_simulation_engine,
    take_undelivered,
    write_wrapper,
)

# More than ThreadPoolExecutor's default cap, min(32, cpu_count + 4), on any machine.
WORKERS = 40


def _all_started(executor_type: type[ThreadPoolExecutor]) -> bool:
    """Submit WORKERS loops that each wait for all to have started, as the engine's workers do."""
    barrier = threading.Barrier(WORKERS, timeout=5.0)
    with executor_type() as executor:
        futures = [executor.submit(barrier.wait) for _ in range(WORKERS)]
        try:
            for future in futures:
                future.result()
        except threading.BrokenBarrierError:
            barrier.abort()
            return False
    return True


def test_every_worker_runs_at_once() -> None:
    assert _all_started(EveryWorkerExecutor)


def test_flwr_default_executor_would_not() -> None:
    """The limit the wrapper removes: the default pool never starts workers beyond its size."""
    assert not _all_started(ThreadPoolExecutor)


def test_patch_targets_the_simulation_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    flwr_dispatch = vce_api.add_messages_to_queue
    monkeypatch.setattr(vce_api, "ThreadPoolExecutor", ThreadPoolExecutor)
    monkeypatch.setattr(vce_api, "add_messages_to_queue", flwr_dispatch)
    monkeypatch.setattr(simulation_runtime, "_replaced_dispatch", None)
    patch_simulation_engine()
    patch_simulation_engine()  # idempotent: flwr's dispatcher stays the one kept
    assert vce_api.ThreadPoolExecutor is EveryWorkerExecutor
    assert vce_api.add_messages_to_queue is deliver_pending
    assert simulation_runtime._replaced_dispatch is flwr_dispatch


class Federation:
    """The Simulation Engine's in-memory LinkState with ``nodes`` registered and one run, and
    the ServerApp's grid pushing messages into it (flwr's own classes, as in a simulation)."""

    def __init__(self, nodes: int) -> None:
        factory = LinkStateFactory(
            FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
        )
        self.nodes = vce_api._register_nodes(nodes, factory)
        self.state = factory.state()
        self.run_id = self.state.create_run(
            None, None, None, {}, NOOP_FEDERATION_ID, None, None, "serverapp"
        )
        self.grid = InMemoryGrid(factory)
        self.grid.set_run(self.state._get_run(self.run_id))

    def push(self, node_ids: list[int]) -> None:
        # Flower stamps each Message with the run (and node) of the task building it
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = self.run_id, 1, 1
        content = RecordDict({"config": ConfigRecord({"x": 1})})
        self.grid.push_messages([Message(content, node, "train") for node in node_ids])

    def flwr_sweep(self) -> list[Message]:
        """One sweep of flwr's ``add_messages_to_queue``."""
        return [m for n in self.nodes for m in self.state.get_message_ins(node_id=n, limit=1)]


@pytest.fixture
def federation() -> Iterator[type[Federation]]:
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    yield Federation
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def _destinations(messages: list[Message]) -> list[int]:
    return sorted(m.metadata.dst_node_id for m in messages)


def test_a_sweep_delivers_what_flwrs_delivers(federation: type[Federation]) -> None:
    ours, theirs = federation(8), federation(8)
    for fed in (ours, theirs):
        node_ids = list(fed.nodes)
        fed.push([*node_ids, node_ids[0]])  # node 0 has two messages waiting
    sweeps = [(take_undelivered(ours.state, ours.nodes), theirs.flwr_sweep()) for _ in range(3)]
    # first sweep: one message per node; second: node 0's second one; third: nothing left
    assert [len(o) for o, _ in sweeps] == [len(t) for _, t in sweeps] == [8, 1, 0]
    for mine, flwrs in sweeps[:2]:  # to the same partitions (node ids differ per federation)
        assert sorted(ours.nodes[n] for n in _destinations(mine)) == sorted(
            theirs.nodes[n] for n in _destinations(flwrs)
        )
    for message in sweeps[0][0]:
        assert message.metadata.delivered_at != ""  # marked, as get_message_ins marks them


def test_a_sweep_validates_each_stored_message_once_not_once_per_node(
    federation: type[Federation], monkeypatch: pytest.MonkeyPatch
) -> None:
    """flwr's sweep validates nodes x stored messages; ours the undelivered ones, once each."""
    nodes = 60
    counts: dict[str, int] = {}

    def counting(fed: Federation, name: str) -> None:
        check = fed.state._check_stored_messages

        def counted(*args: Any, **kwargs: Any) -> None:
            counts[name] = counts.get(name, 0) + 1
            check(*args, **kwargs)

        monkeypatch.setattr(fed.state, "_check_stored_messages", counted)

    ours, theirs = federation(nodes), federation(nodes)
    for fed, name in ((ours, "ours"), (theirs, "flwr")):
        fed.push(list(fed.nodes))
        counting(fed, name)
    take_undelivered(ours.state, ours.nodes)
    theirs.flwr_sweep()
    assert counts == {"ours": nodes, "flwr": nodes * (nodes + 1) // 2}
    counts.clear()  # every message delivered, none answered yet: what a round mostly waits on
    take_undelivered(ours.state, ours.nodes)
    theirs.flwr_sweep()
    assert counts.get("ours", 0) == 0 and counts["flwr"] == nodes * nodes


def test_the_dispatcher_feeds_the_queue_until_stopped(federation: type[Federation]) -> None:
    from queue import Queue

    fed = federation(5)
    fed.push(list(fed.nodes))
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    thread = threading.Thread(target=deliver_pending, args=(fed.state, queue, fed.nodes, stop))
    thread.start()
    received = [queue.get(timeout=10) for _ in range(5)]
    stop.set()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert _destinations(received) == sorted(fed.nodes)


def test_wrapper_runs_flwr_simulation(tmp_path: Path) -> None:
    script = write_wrapper(tmp_path / "bin")
    assert script.name == simulation_runtime.COMMAND
    done = subprocess.run(
        [str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "--runtime-api-address" in done.stdout  # flwr-simulation's own usage
