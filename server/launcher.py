"""Run the Flower app the supported way: a private ``flower-superlink --simulation`` + ``flwr run``.

``fedserve-train`` uses this instead of the deprecated ``flwr.simulation.run_simulation`` so both
entry points share one code path (the FAB that ``flwr run .`` builds). The SuperLink gets free
127.0.0.1 ports and its own FLWR_HOME, so it never clashes with a user's ``~/.flwr`` or another run,
and it is always stopped — with its whole process group (simulation and Ray processes included) —
when the context exits, however it exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PROJECT_DIR = Path(__file__).resolve().parents[1]
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


@dataclass
class SuperLink:
    """A running SuperLink: the address of its APIs and the ``flwr`` connection that names it."""

    process: subprocess.Popen[bytes]
    flwr_home: Path
    address: str
    log_file: Path
    connection: str = "fedserve"

    def run(
        self,
        run_config: dict[str, str],
        num_supernodes: int | None = None,
        app_dir: Path = PROJECT_DIR,
        timeout: float | None = None,
    ) -> None:
        """``flwr run`` the app and stream its logs until the run ends; raise if it failed."""
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
        completed = subprocess.run(command, env=flwr_env(self.flwr_home), timeout=timeout)
        if completed.returncode != 0:
            raise RuntimeError(f"`flwr run` exited with {completed.returncode}; see {self.log_file}")
        self.raise_if_run_failed()

    def raise_if_run_failed(self) -> None:
        """``flwr run --stream`` exits 0 even when the ServerApp raised: read the run's status."""
        out = subprocess.run(
            [flwr_bin("flwr"), "ls", ".", self.connection, "--format", "json"],
            env=flwr_env(self.flwr_home),
            capture_output=True,
            text=True,
            cwd=PROJECT_DIR,
        )
        if out.returncode == 0 and '"failed"' in out.stdout.lower():
            raise RuntimeError(f"the Flower run failed; see {self.log_file}")


@contextlib.contextmanager
def local_superlink(
    simulation: bool = True,
    certificates: tuple[Path, Path, Path] | None = None,
    flwr_home: Path | None = None,
) -> Iterator[SuperLink]:
    """Start a SuperLink on free ports (TLS when ``certificates`` = (ca, cert, key)); stop it after."""
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
    link = SuperLink(process, home, f"127.0.0.1:{port}", log_file)
    try:
        _wait_for_port(port, process, log_file)
        yield link
    finally:
        stop_process_group(process)
        if owned_home:
            _remove_tree(home)


def stop_process_group(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)


def _write_connection(home: Path, address: str, root_certificates: Path | None) -> None:
    lines = ["[superlink]", 'default = "fedserve"', "", "[superlink.fedserve]"]
    lines.append(f'address = "{address}"')
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{root_certificates}"')
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log_file: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {process.returncode}; see {log_file}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"flower-superlink did not listen on 127.0.0.1:{port} in 30 s; see {log_file}")


def _toml(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
