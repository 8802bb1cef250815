"""Run the Flower app the supported way: a private ``flower-superlink`` + ``flwr run``.

``fedserve-train`` uses this instead of the deprecated ``flwr.simulation.run_simulation`` so both
entry points share one code path (the FAB that ``flwr run .`` builds). The SuperLink gets free
127.0.0.1 ports and its own FLWR_HOME, so it never clashes with a user's ``~/.flwr`` or another run,
and it is always stopped — with its whole process group (simulation and Ray processes included) —
when the context exits, however it exits.

The same code runs a real deployment on one machine: ``local_superlink(simulation=False)`` plus
:func:`local_supernodes`, one ``flower-supernode`` per partition, each with its own FLWR_HOME and
Runtime API port, all on 127.0.0.1 — exactly what runs across machines, minus the network.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[1]
RUN_COMPLETED = "finished:completed"
_STARTED_RUN = re.compile(r"started run (\d+)", re.IGNORECASE)
FLWR_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_DEDUP_LOGS": "0",
}


def flwr_bin(name: str) -> str:
    """A Flower executable from this interpreter's environment (works without an activated venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def flwr_env(flwr_home: Path) -> dict[str, str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, **FLWR_ENV, "FLWR_HOME": str(flwr_home), "PATH": path}


class RunFailedError(RuntimeError):
    """A Flower run ended in a status other than ``finished:completed``."""


@dataclass
class SuperLink:
    """A running SuperLink: the address of its APIs and the ``flwr`` connection that names it.

    ``address`` serves the Fleet, Control and Runtime APIs (flwr 1.42: one HTTP port), so it is both
    what SuperNodes pass as ``--superlink`` and what the ``flwr`` CLI connects to.
    ``root_certificates`` is the CA that signed its TLS certificate (None: insecure).
    """

    process: subprocess.Popen[bytes]
    flwr_home: Path
    address: str
    log_file: Path
    connection: str = "fedserve"
    root_certificates: Path | None = None

    def run(
        self,
        run_config: dict[str, str],
        num_supernodes: int | None = None,
        app_dir: Path = PROJECT_DIR,
        timeout: float | None = None,
    ) -> int:
        """``flwr run`` the app, stream its logs until the run ends; return the run id.

        Raises :class:`RunFailedError` when the run did not finish ``completed`` (``flwr run
        --stream`` exits 0 even when the ServerApp raised) and ``RuntimeError`` when ``flwr run``
        itself failed or outlived ``timeout`` seconds. ``num_supernodes`` sizes a simulation; leave
        it None against a deployment SuperLink, whose SuperNodes are the federation.
        """
        command = [flwr_bin("flwr"), "run", str(app_dir), self.connection, "--stream"]
        if run_config:
            # A TOML file, not key=value pairs: the CLI's inline parser rejects escaped quotes.
            config_file = self.flwr_home / "run-config.toml"
            config_file.write_text("".join(f"{k} = {_toml(v)}\n" for k, v in run_config.items()))
            command += ["--run-config", str(config_file)]
        if num_supernodes is not None:
            command += [
                "--federation-config",
                f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
            ]
        log.info("running: %s", " ".join(command))
        returncode, run_ids = _run_and_tee(command, flwr_env(self.flwr_home), timeout)
        if returncode != 0:
            raise RuntimeError(f"`flwr run` exited with {returncode}; see {self.log_file}")
        if not run_ids:
            log.warning("`flwr run` printed no run id; checking every run on this SuperLink")
        self.raise_if_run_failed(run_ids[-1] if run_ids else None)
        return run_ids[-1] if run_ids else -1

    def runs(self, run_id: int | None = None) -> list[dict]:
        """``flwr ls --format json``: this SuperLink's runs (or one), as dicts with ``status``."""
        args = ["ls", self.connection, "--format", "json"]
        if run_id is not None:
            args += ["--run-id", str(run_id)]
        return self._flwr_json(args)["runs"]

    def supernodes(self) -> list[dict]:
        """``flwr supernode ls --format json``: the SuperNodes registered with this SuperLink."""
        return self._flwr_json(["supernode", "ls", self.connection, "--format", "json"])["nodes"]

    def raise_if_run_failed(self, run_id: int | None = None) -> None:
        """Raise :class:`RunFailedError` unless the run (every run if None) finished completed.

        ``flwr ls --format json`` reports ``"status": "finished:completed"`` for a good run,
        ``"finished:failed"`` (with ``status-details`` holding the ServerApp's exception) or
        ``"finished:stopped"`` otherwise.
        """
        runs = self.runs(run_id)
        if run_id is not None and not runs:
            raise RunFailedError(f"run {run_id} is unknown to the SuperLink; see {self.log_file}")
        for run in runs:
            if run.get("status") != RUN_COMPLETED:
                details = run.get("status-details") or "no details"
                raise RunFailedError(
                    f"Flower run {run.get('run-id')} ended {run.get('status')!r}: {details}; "
                    f"see the ServerApp log above and {self.log_file}"
                )

    def wait_for_supernodes(self, count: int, timeout: float = 60.0) -> list[dict]:
        """Poll until ``count`` SuperNodes are online; raise ``TimeoutError`` naming who is."""
        deadline = time.monotonic() + timeout
        while True:
            online = [n for n in self.supernodes() if n.get("status") == "online"]
            if len(online) >= count:
                return online
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(online)} of {count} SuperNodes online at {self.address} after "
                    f"{timeout:.0f} s; see the SuperNode logs and {self.log_file}"
                )
            time.sleep(0.5)

    def _flwr_json(self, args: list[str]) -> dict:
        # cwd: not a project directory, else the CLI tries to migrate pyproject.toml settings
        out = subprocess.run(
            [flwr_bin("flwr"), *args],
            env=flwr_env(self.flwr_home),
            capture_output=True,
            text=True,
            cwd=self.flwr_home,
            timeout=120,
        )
        try:
            data = json.loads(out.stdout)
        except json.JSONDecodeError:
            data = {"success": False, "error-message": (out.stdout + out.stderr)[-2000:]}
        if out.returncode != 0 or not data.get("success"):
            raise RuntimeError(
                f"`flwr {' '.join(args)}` failed ({out.returncode}): {data.get('error-message')}"
            )
        return data


@dataclass
class SuperNode:
    """A running ``flower-supernode`` serving one partition of the federation."""

    process: subprocess.Popen[bytes]
    partition_id: int
    flwr_home: Path
    runtime_port: int
    log_file: Path


@contextlib.contextmanager
def local_superlink(
    simulation: bool = True,
    certificates: tuple[Path, Path, Path] | None = None,
    flwr_home: Path | None = None,
) -> Iterator[SuperLink]:
    """Start a SuperLink on a free port, stop it (and its process group) after.

    TLS when ``certificates`` = (ca, cert, key), PEM files (``scripts/generate_certs.py`` writes
    them); ``simulation=False`` gives a deployment SuperLink that :func:`local_supernodes` join.
    """
    owned_home = flwr_home is None
    home = Path(tempfile.mkdtemp(prefix="fedserve-flwr-")) if flwr_home is None else flwr_home
    home.mkdir(parents=True, exist_ok=True)
    # flwr 1.42 serves the Runtime, Control and Fleet APIs on one HTTP port.
    port = free_port()
    log_file = home / "superlink.log"
    command = [
        flwr_bin("flower-superlink"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-file",
        str(log_file),
        "--disable-runtime-dependency-installation",
    ]
    if simulation:
        command.append("--simulation")
    if certificates is None:
        command.append("--insecure")
    else:
        ca, cert, key = certificates
        command += ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert)]
        command += ["--ssl-keyfile", str(key)]
    _write_connection(home, f"127.0.0.1:{port}", certificates[0] if certificates else None)
    process = subprocess.Popen(
        command,
        env=flwr_env(home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: stopping it stops its children too
    )
    ca = certificates[0] if certificates else None
    link = SuperLink(process, home, f"127.0.0.1:{port}", log_file, root_certificates=ca)
    try:
        _wait_for_port(port, process, log_file, "flower-superlink")
        yield link
    finally:
        stop_process_group(process)
        if owned_home:
            _remove_tree(home)


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
            nodes.append(_start_supernode(link.address, partition_id, config, ca, base))
        for node in nodes:
            _wait_for_port(node.runtime_port, node.process, node.log_file, "flower-supernode")
        if wait:
            link.wait_for_supernodes(num_nodes, timeout=timeout)
        yield nodes
    finally:
        stop_process_groups([node.process for node in nodes])
        if owned_base:
            _remove_tree(base)


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
    config = " ".join(f"{k}={_toml(v)}" for k, v in node_config.items())
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
) -> SuperNode:
    home = base / f"supernode-{partition_id}"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_file = home / "supernode.log"
    command = supernode_command(superlink, node_config, root_certificates, port)
    with log_file.open("wb") as out:
        process = subprocess.Popen(
            command,
            env=flwr_env(home),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    log.info("supernode %d (pid %d): %s", partition_id, process.pid, " ".join(command))
    return SuperNode(process, partition_id, home, port, log_file)


def stop_process_group(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds."""
    stop_process_groups([process], grace)


def stop_process_groups(processes: Sequence[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """SIGTERM every process group at once, SIGKILL what is left after ``grace`` seconds."""
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:  # the leader may be gone while its children linger
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)


def _run_and_tee(
    command: list[str], env: dict[str, str], timeout: float | None
) -> tuple[int, list[int]]:
    """Run ``command``, copying its stdout to ours line by line; return (exit code, run ids)."""
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, bufsize=1
    )
    run_ids: list[int] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if match := _STARTED_RUN.search(line):
                run_ids.append(int(match.group(1)))

    thread = threading.Thread(target=pump, name="flwr-run-stdout", daemon=True)
    thread.start()
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise RuntimeError(f"`flwr run` did not finish in {timeout} s") from None
    finally:
        thread.join(timeout=10)
    return returncode, run_ids


def _write_connection(home: Path, address: str, root_certificates: Path | None) -> None:
    lines = ["[superlink]", 'default = "fedserve"', "", "[superlink.fedserve]"]
    lines.append(f'address = "{address}"')
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{root_certificates}"')
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def _wait_for_port(
    port: int, process: subprocess.Popen[bytes], log_file: Path, name: str, timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}; see {log_file}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(
        f"{name} did not listen on 127.0.0.1:{port} in {timeout:.0f} s; see {log_file}"
    )


def _toml(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
