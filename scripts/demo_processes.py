"""Processes the demo starts: ``fedserve-serve`` and ``fedserve-train`` in their own process
groups, their readiness, and stopping each with every process it started."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from scripts.demo_client import MODEL_NAME, DemoFailed
from server.processes import descendants, free_port, stop_process_group
from serving.v2_client import V2Client

PROJECT_DIR = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def child_env() -> dict[str, str]:
    """This process's environment as it is now (a caller may have added, e.g., a model store's
    credentials after this module was imported), without forced colours: fedserve-train parses
    JSON from the Flower CLI, which FORCE_COLOR would colour."""
    return {
        **{k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "CLICOLOR_FORCE")},
        "NO_COLOR": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def spawn(command: list[str], log_path: Path, cwd: Path = PROJECT_DIR) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own session (process group), stdout+stderr to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            command,
            cwd=cwd,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


class ProcessTree:
    """A started process and every descendant seen so far: Flower's SuperLink and Ray run in
    sessions of their own, and a Ray worker whose parent died is no longer below the process, so
    :meth:`refresh` (called while it runs) remembers them for :meth:`stop`."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self._known: dict[int, psutil.Process] = {}
        self.refresh()

    def refresh(self) -> None:
        for proc in descendants(self.process.pid):
            self._known.setdefault(proc.pid, proc)

    def stop(self, first: int = signal.SIGINT, grace: float = 30.0) -> None:
        """``first`` to the process group, then SIGKILL whatever of the tree is left after
        ``grace`` s (:func:`server.processes.stop_process_group`)."""
        self.refresh()
        stop_process_group(self.process, grace, first, known=self._known.values())


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
        with V2Client(self.address, timeout=2.0) as client:
            try:
                client.wait_until_ready(timeout, process=self.tree.process)
            except (RuntimeError, TimeoutError) as err:
                raise DemoFailed(f"fedserve-serve: {err}; see {self.log_path}") from None

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


def start_server(name: str, repository: Path | str, log_path: Path, overrides: list[str]) -> Server:
    """Spawn ``fedserve-serve`` on free ports, HTTP and gRPC (call :meth:`Server.wait_ready`
    next): gRPC's default 8001 would be taken by a second server or another run."""
    port = free_port()
    command = [
        str(BIN / "fedserve-serve"),
        f"repository={repository}",
        f"port={port}",
        f"serving.grpc_port={free_port()}",
        "log_level=warning",
        *overrides,
    ]
    return Server(name, ProcessTree(spawn(command, log_path)), port, log_path)
