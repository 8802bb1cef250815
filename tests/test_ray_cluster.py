"""Simulation on a running Ray cluster: ``simulation.ray_address`` (the SuperLink's RAY_ADDRESS).

The slow test starts a two-node cluster on this machine — a head and a worker, separate
``ray start --block`` processes, each with one CPU and a custom resource of its own
(``fedserve_head``, ``fedserve_worker``) — then runs ``fedserve-train`` on it: flwr sizes its
actor pool per node (one client at a time on each), and each actor logs the node it runs on
(:class:`server.simulation_runtime.NodeReport`), so the log shows clients on both nodes. Every
Ray process is stopped by pid at the end and the test's environment marker proves none is left.
The fast tests: a Ray address that does not answer is refused at once with one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from process_marker import VARIABLE, wait_until_marked_gone
from runs import run_train

from server.launcher import check_ray_address
from server.processes import free_port, marked_processes, stop_process_groups
from task.config import ConfigError

RAY = str(Path(sys.executable).parent / "ray")
NODE_LINE = re.compile(r"ClientApp actor \(pid (\d+)\) on Ray node (\w+) at \S+ with (.*)$")
ALIVE_NODES = (
    "import sys, ray\n"
    "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
    "print(sum(1 for node in ray.nodes() if node['Alive']))\n"
)


def _ray_start(extra: list[str], temp_dir: Path, log_file: Path) -> subprocess.Popen[bytes]:
    """One ``ray start --block`` node: every port free and its own, so two nodes share a host
    (and no other Ray instance on the machine is touched)."""
    ports = {
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
    }
    command = [RAY, "start", "--block", "--num-cpus=1", "--disable-usage-stats"]
    command += ["--node-ip-address=127.0.0.1", *extra]
    command += [f"{flag}={port}" for flag, port in ports.items()]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    with log_file.open("wb") as out:
        return subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _alive_nodes(address: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", ALIVE_NODES, address], capture_output=True, text=True, timeout=60
    )
    return int(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else 0


@contextlib.contextmanager
def two_node_cluster(log_dir: Path) -> Iterator[str]:
    """A head and a worker node on 127.0.0.1; yields the head's address; stops both after."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Ray's socket paths must stay short: a temp dir of its own under /tmp, not pytest's
    temp_dir = Path(tempfile.mkdtemp(prefix="fsray-", dir="/tmp"))
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        head = [
            "--head",
            f"--port={port}",
            f"--temp-dir={temp_dir}",
            "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}",
            '--resources={"fedserve_head": 1}',
        ]
        nodes.append(_ray_start(head, temp_dir, log_dir / "ray-head.log"))
        deadline = time.monotonic() + 120
        while _alive_nodes(address) < 1:
            assert nodes[0].poll() is None, (log_dir / "ray-head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(1)
        worker = [f"--address={address}", '--resources={"fedserve_worker": 1}']
        nodes.append(_ray_start(worker, temp_dir, log_dir / "ray-worker.log"))
        while _alive_nodes(address) < 2:
            assert nodes[1].poll() is None, (log_dir / "ray-worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray worker node did not join"
            time.sleep(1)
        yield address
    finally:
        # every process of both nodes, by pid: the `ray start` processes, their groups and all
        # below them (never `ray stop`, which would stop every Ray instance on the machine)
        stop_process_groups(nodes, grace=10.0)
        marker = os.environ[VARIABLE]
        for proc in marked_processes(marker, VARIABLE):
            if "ray" in " ".join(proc.cmdline()):
                proc.kill()
        subprocess.run(["rm", "-rf", str(temp_dir)], check=False)


@pytest.mark.slow
def test_fedserve_train_runs_its_clients_on_both_nodes_of_a_ray_cluster(
    tmp_path: Path, process_marker: str
) -> None:
    run_dir = tmp_path / "run"
    with two_node_cluster(tmp_path) as address:
        result = run_train(
            [
                f"simulation.ray_address={address}",
                "rounds=2",
                "num_clients=4",
                "model=mlp",
                "train.local_epochs=1",
                "repository=null",
                f"hydra.run.dir={run_dir}",
            ],
            tmp_path,
            600,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-4000:]
        (tmp_path / "train.log").write_text(output)

    actors = {
        m.group(2): m.group(3) for line in output.splitlines() if (m := NODE_LINE.search(line))
    }
    # two nodes, one CPU each, one CPU per client: one actor on each node, and both ran clients
    assert len(actors) == 2, output[-4000:]
    resources = sorted(actors.values())
    assert "fedserve_head=1" in resources[0] and "fedserve_worker=1" in resources[1], resources
    history = json.loads((run_dir / "history.json").read_text())
    assert [r["counts"]["accepted"] for r in history["rounds"]] == [4, 4]
    assert history["final_test_acc"] > 0.5
    assert wait_until_marked_gone(process_marker, timeout=30) == []


def test_a_ray_address_that_does_not_answer_is_refused_at_once(
    tmp_path: Path, process_marker: str
) -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    result = run_train(
        [f"simulation.ray_address=127.0.0.1:{port}", f"hydra.run.dir={tmp_path}"], tmp_path, 120
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [
        f"fedserve-train: invalid configuration: simulation.ray_address=127.0.0.1:{port}: the "
        "Ray head does not answer (Connection refused after connecting for up to 5 s); start it "
        f"with `ray start --head --port={port}` or fix the address"
    ]
    assert time.monotonic() - started < 60  # no SuperLink, no Ray was started for it
    assert wait_until_marked_gone(process_marker) == []


@pytest.mark.parametrize("address", ["ray://10.0.0.5:10001", "10.0.0.5", "head:port", ":6379"])
def test_a_malformed_ray_address_names_the_expected_form(address: str) -> None:
    with pytest.raises(ConfigError, match=r"simulation.ray_address must be host:port"):
        check_ray_address(address)


def test_a_port_that_accepts_but_does_not_speak_ray_is_refused_in_time() -> None:
    """A listening socket nobody serves completes the TCP handshake (as a proxy would for any
    address): the check must wait for a gRPC answer, and give up after its timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(ConfigError, match="a connection, but no gRPC server within 1 s"):
            check_ray_address(address, timeout=1.0)
    assert time.monotonic() - started < 10
