"""A real deployment on one machine: one ``flower-supernode`` per partition, as across machines."""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from server.launcher import SuperLink, flwr_bin, flwr_env, toml_value
from server.processes import free_port, stop_process_groups, wait_for_port

log = logging.getLogger(__name__)


@dataclass
class SuperNode:
    """A running ``flower-supernode`` serving one partition of the federation."""

    process: subprocess.Popen[bytes]
    partition_id: int
    flwr_home: Path
    runtime_port: int
    log_file: Path


@contextlib.contextmanager
def local_supernodes(
    link: SuperLink,
    num_nodes: int,
    root_certificates: Path | None = None,
    base_dir: Path | None = None,
    node_config: dict[str, str | int | float] | None = None,
    wait: bool = True,
    timeout: float = 60.0,
) -> Iterator[list[SuperNode]]:
    """Start ``num_nodes`` ``flower-supernode`` processes against ``link``; stop them after.

    Node ``i`` gets ``--node-config 'partition-id=i num-partitions=num_nodes'`` (plus
    ``node_config``), its own FLWR_HOME (where it installs the FAB it is sent) under ``base_dir``,
    its own free Runtime API port, and its own process group, so the ``flwr-clientapp`` processes it
    spawns are stopped with it. ``root_certificates``: the CA that verifies the SuperLink's TLS
    certificate (default ``link.root_certificates``; neither: ``--insecure``).
    With ``wait`` the context enters once all nodes are online at the SuperLink.
    """
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    ca = root_certificates or link.root_certificates
    owned_base = base_dir is None
    base = Path(tempfile.mkdtemp(prefix="fedserve-nodes-")) if base_dir is None else base_dir
    nodes: list[SuperNode] = []
    try:
        for partition_id in range(num_nodes):
            config = {"partition-id": partition_id, "num-partitions": num_nodes}
            config.update(node_config or {})
            nodes.append(
                _start_supernode(link.address, partition_id, config, ca, base, link.marker)
            )
        for node in nodes:
            wait_for_port(node.runtime_port, node.process, node.log_file, "flower-supernode")
        if wait:
            link.wait_for_supernodes(num_nodes, timeout=timeout)
        yield nodes
    finally:
        stop_process_groups([node.process for node in nodes])
        if owned_base:
            shutil.rmtree(base, ignore_errors=True)


def supernode_command(
    superlink: str,
    node_config: dict[str, str | int | float],
    root_certificates: Path | None = None,
    runtime_port: int | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line for one node (what the README runs by hand)."""
    command = [flwr_bin("flower-supernode"), "--superlink", superlink]
    if root_certificates is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(root_certificates)]
    config = " ".join(f"{k}={toml_value(v)}" for k, v in node_config.items())
    command += ["--node-config", config]
    if runtime_port is not None:
        command += ["--host", "127.0.0.1", "--port", str(runtime_port)]
    return command


def _start_supernode(
    superlink: str,
    partition_id: int,
    node_config: dict[str, str | int | float],
    root_certificates: Path | None,
    base: Path,
    marker: str | None,
) -> SuperNode:
    home = base / f"supernode-{partition_id}"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_file = home / "supernode.log"
    command = supernode_command(superlink, node_config, root_certificates, port)
    with log_file.open("wb") as out:
        process = subprocess.Popen(
            command,
            env=flwr_env(home, marker),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    log.info("supernode %d (pid %d): %s", partition_id, process.pid, " ".join(command))
    return SuperNode(process, partition_id, home, port, log_file)
