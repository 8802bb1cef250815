"""Processes the demo starts: ``fedserve-serve`` and ``fedserve-train`` in their own process
groups, readiness waits, and stopping a whole process tree."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from demo_client import MODEL_NAME, DemoFailed, V2Client

PROJECT_DIR = Path(__file__).resolve().parents[1]
if str(PROJECT_DIR) not in sys.path:
    sys.path.insert(0, str(PROJECT_DIR))

BIN = Path(sys.executable).parent
# No forced colours: fedserve-train parses JSON from the Flower CLI, which FORCE_COLOR would colour.
ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "CLICOLOR_FORCE")},
    "NO_COLOR": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "PYTHONUNBUFFERED": "1",
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(command: list[str], log_path: Path, cwd: Path = PROJECT_DIR) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own session (process group), stdout+stderr to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=ENV,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


class ProcessTree:
    """A started process and every descendant seen so far (Flower's SuperLink and Ray run in
    sessions of their own, so its process group alone does not cover them)."""

    def __init__(self, process: subprocess.Popen[bytes], name: str) -> None:
        self.process = process
        self.name = name
        self._known: dict[int, Any] = {}
        self.refresh()

    def refresh(self) -> None:
        try:
            import psutil
        except ImportError:  # pragma: no cover - psutil is a dev dependency; the group still stops
            return
        try:
            root = psutil.Process(self.process.pid)
            for proc in [root, *root.children(recursive=True)]:
                self._known.setdefault(proc.pid, proc)
        except psutil.Error:
            pass

    def stop(self, first: int = signal.SIGINT, grace: float = 30.0) -> None:
        """``first`` to the process group, wait ``grace`` s, then SIGKILL the group and any
        remembered descendant still alive."""
        self.refresh()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, first)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                print(f"  {self.name} did not stop within {grace:.0f} s: killing it", flush=True)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self._kill_leftovers(grace=10.0)

    def _kill_leftovers(self, grace: float) -> None:
        try:
            import psutil
        except ImportError:  # pragma: no cover
            return
        alive = []
        for proc in self._known.values():
            with contextlib.suppress(psutil.Error):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
        if not alive:
            return
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(alive, timeout=grace)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=5)


@dataclass
class Server:
    """A running ``fedserve-serve``."""

    name: str
    tree: ProcessTree
    port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.tree.process.poll() is not None:
                raise DemoFailed(
                    f"fedserve-serve exited with {self.tree.process.returncode}; "
                    f"see {self.log_path}"
                )
            client = V2Client(self.address, timeout=2.0)
            try:
                if client.ready():
                    return
            except (OSError, http.client.HTTPException):
                pass
            finally:
                client.close()
            time.sleep(0.1)
        raise DemoFailed(
            f"fedserve-serve did not get ready within {timeout:.0f} s; see {self.log_path}"
        )

    def timings(self) -> dict[int, dict[str, Any]]:
        """The watcher's ``swap timing {json}`` log lines, by version."""
        found: dict[int, dict[str, Any]] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in self.log_path.read_text(errors="replace").splitlines():
                if "swap timing {" in line:
                    doc = json.loads(line[line.index("{") :])
                    if doc.get("model") == MODEL_NAME:
                        found[int(doc["version"])] = doc
        return found


def start_server(name: str, repository: Path, log_path: Path, overrides: list[str]) -> Server:
    """Spawn ``fedserve-serve`` on a free port (call :meth:`Server.wait_ready` next)."""
    port = free_port()
    command = [
        str(BIN / "fedserve-serve"),
        f"repository={repository}",
        f"port={port}",
        "log_level=warning",
        *overrides,
    ]
    return Server(name, ProcessTree(spawn(command, log_path), name), port, log_path)
