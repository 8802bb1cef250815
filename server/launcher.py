"""Run the Flower app the supported way: a private ``flower-superlink`` + ``flwr run``.

``fedserve-train`` uses this instead of the deprecated ``flwr.simulation.run_simulation`` so both
entry points share one code path (the FAB that ``flwr run .`` builds). The SuperLink gets free
127.0.0.1 ports and its own FLWR_HOME, so it never clashes with a user's ``~/.flwr`` or another run,
and it is always stopped — with every process below it (simulation and Ray included, see
:mod:`server.processes`) — when the context exits, however it exits.

The same code runs a real deployment on one machine: ``local_superlink(simulation=False)`` plus
:func:`server.supernodes.local_supernodes`, one ``flower-supernode`` per partition, each with its
own FLWR_HOME and Runtime API port, all on 127.0.0.1 — what runs across machines, minus the network.

A simulation can run its clients on a Ray cluster that is already running
(``local_superlink(ray_address="head:6379")``): flwr 1.42's Ray backend calls ``ray.init()``
without an address, which joins the cluster named by ``RAY_ADDRESS``, so the SuperLink (and the
simulation process it starts) gets that variable. The cluster is not ours: stopping the run ends
the simulation's driver, whose actors Ray then removes, and leaves the cluster's processes alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from server.app_bundle import stage_app
from server.job_config import ray_host_port
from server.orphan_watch import OrphanWatch
from server.processes import free_port, marker_env, stop_marked, stop_process_group, wait_for_port
from server.simulation_runtime import write_wrapper
from task.config import ConfigError

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
#: seconds a Ray head has to accept a connection before the run is refused
RAY_CONNECT_TIMEOUT_S = 5.0


def flwr_bin(name: str) -> str:
    """A Flower executable from this interpreter's environment (works without an activated venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flwr_env(flwr_home: Path, marker: str | None = None) -> dict[str, str]:
    """The environment for Flower's processes: our venv first on PATH, a private FLWR_HOME, no
    forced colours (Jupyter sets FORCE_COLOR, and the CLI's coloured JSON would not parse), and
    the run ``marker`` of the :class:`~server.orphan_watch.OrphanWatch` they die with."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "CLICOLOR_FORCE")}
    env = {**env, **FLWR_ENV, "NO_COLOR": "1", "FLWR_HOME": str(flwr_home), "PATH": path}
    if marker is not None:
        env.update(marker_env(marker))
    return env


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
    #: the run marker of the orphan watch guarding everything started for this SuperLink
    marker: str | None = None

    def run(
        self,
        run_config: dict[str, str],
        num_supernodes: int | None = None,
        app_dir: Path = PROJECT_DIR,
        timeout: float | None = None,
        client_cpus: int = 1,
        client_gpus: float = 0.0,
    ) -> int:
        """``flwr run`` the app, stream its logs until the run ends; return the run id.

        Raises :class:`RunFailedError` when the run did not finish ``completed`` (``flwr run
        --stream`` exits 0 even when the ServerApp raised) and ``RuntimeError`` when ``flwr run``
        itself failed or outlived ``timeout`` seconds. ``num_supernodes`` sizes a simulation; leave
        it None against a deployment SuperLink, whose SuperNodes are the federation.
        ``client_cpus`` / ``client_gpus``: the CPUs and GPU share Ray reserves for each simulated
        client (Ray hides GPUs from actors that reserve none, so clients train on CUDA only when
        ``client_gpus`` > 0).
        """
        # the app's publishable files only: `flwr run` walks every file under the directory it
        # is given, a project's .venv included (~7 s here), and builds the same FAB from these
        staged = Path(tempfile.mkdtemp(prefix="app-", dir=self.flwr_home))
        try:
            return self._run(
                stage_app(app_dir, staged / "app"),
                run_config,
                num_supernodes,
                timeout,
                client_cpus,
                client_gpus,
            )
        finally:
            shutil.rmtree(staged, ignore_errors=True)

    def _run(
        self,
        app_dir: Path,
        run_config: dict[str, str],
        num_supernodes: int | None,
        timeout: float | None,
        client_cpus: int,
        client_gpus: float,
    ) -> int:
        command = [flwr_bin("flwr"), "run", str(app_dir), self.connection, "--stream"]
        if run_config:
            # A TOML file, not key=value pairs: the CLI's inline parser rejects escaped quotes.
            config_file = self.flwr_home / "run-config.toml"
            lines = [f"{key} = {toml_value(value)}\n" for key, value in run_config.items()]
            config_file.write_text("".join(lines))
            command += ["--run-config", str(config_file)]
        if num_supernodes is not None:
            resources = f"num-supernodes={num_supernodes} client-resources-num-cpus={client_cpus}"
            if client_gpus > 0:
                resources += f" client-resources-num-gpus={client_gpus}"
            command += ["--federation-config", resources]
        log.info("running: %s", " ".join(command))
        started = time.monotonic()
        returncode, run_ids = _run_and_tee(command, flwr_env(self.flwr_home, self.marker), timeout)
        run_id = run_ids[-1] if run_ids else None
        if returncode != 0:
            if run_id is None:
                raise RuntimeError(f"`flwr run` exited with {returncode}; see {self.log_file}")
            # The run was submitted; only the CLI's log stream ended (it does when the SuperLink
            # is slow to answer under load). The run goes on: follow it by its status instead.
            log.warning(
                "`flwr run` exited with %d while streaming the logs of run %d; waiting for the "
                "run to finish (logs: %s)",
                returncode,
                run_id,
                self.log_file,
            )
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - started))
            self.wait_for_run(run_id, left)
        if run_id is None:
            log.warning("`flwr run` printed no run id; checking every run on this SuperLink")
        self.raise_if_run_failed(run_id)
        return run_id if run_id is not None else -1

    def wait_for_run(self, run_id: int, timeout: float | None = None, poll: float = 1.0) -> str:
        """Poll ``flwr ls`` until run ``run_id`` finished; return its status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            runs = self.runs(run_id)
            status = str(runs[0].get("status", "")) if runs else ""
            if status.startswith("finished"):
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(
                    f"run {run_id} did not finish in {timeout:.0f} s (status {status!r}); "
                    f"see {self.log_file}"
                )
            time.sleep(poll)

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
            env=flwr_env(self.flwr_home, self.marker),
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


@contextlib.contextmanager
def local_superlink(
    simulation: bool = True,
    certificates: tuple[Path, Path, Path] | None = None,
    flwr_home: Path | None = None,
    ray_address: str | None = None,
) -> Iterator[SuperLink]:
    """Start a SuperLink on a free port, stop it (and its process group) after.

    TLS when ``certificates`` = (ca, cert, key), PEM files (``scripts/generate_certs.py`` writes
    them); ``simulation=False`` gives a deployment SuperLink that SuperNodes join
    (:func:`server.supernodes.local_supernodes`). ``ray_address``: the simulation's clients run
    on that running Ray cluster (see the module docstring; :func:`check_ray_address` first).
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
    watch = OrphanWatch()
    env = flwr_env(home, watch.marker)
    if simulation:  # our flwr-simulation first: every simulated client can run at once
        wrapper = write_wrapper(home / "bin")
        env["PATH"] = f"{wrapper.parent}{os.pathsep}{env['PATH']}"
        if ray_address is not None:
            env["RAY_ADDRESS"] = ray_address
        else:  # a RAY_ADDRESS of the caller's must not move the run onto a cluster unasked
            env.pop("RAY_ADDRESS", None)
    try:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopping it stops its children too
        )
        ca = certificates[0] if certificates else None
        link = SuperLink(
            process, home, f"127.0.0.1:{port}", log_file, root_certificates=ca, marker=watch.marker
        )
        try:
            wait_for_port(port, process, log_file, "flower-superlink")
            yield link
        finally:
            stop_process_group(process)
            stop_marked(watch.marker)  # what left the tree: SuperNodes, re-parented Ray workers
    finally:
        watch.close()
        if owned_home:
            shutil.rmtree(home, ignore_errors=True)


def check_ray_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """ConfigError (one line) unless a Ray head answers at ``address`` (host:port) within
    ``timeout`` seconds: a run must not hang on a cluster that is not there.

    Answering means speaking gRPC (Ray's GCS is a gRPC server), not just accepting a TCP
    connection: a firewall or proxy in between may accept one for any address.
    """
    import grpc

    host, port = ray_host_port(address)
    fix = f"start it with `ray start --head --port={port}` or fix the address"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        reason = "no answer" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise ConfigError(
            f"simulation.ray_address={address}: the Ray head does not answer ({reason} after "
            f"connecting for up to {timeout:g} s); {fix}"
        ) from None
    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise ConfigError(
            f"simulation.ray_address={address}: the Ray head does not answer (a connection, but "
            f"no gRPC server within {timeout:g} s: is that a Ray head's port?); {fix}"
        ) from None
    finally:
        channel.close()


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
        raise RuntimeError(f"`flwr run` did not finish in {timeout} s") from None
    finally:
        # also on SIGINT/SIGTERM of the launcher: the CLI only streams logs, stop it at once
        if process.poll() is None:
            process.kill()
            process.wait()
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


def toml_value(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
