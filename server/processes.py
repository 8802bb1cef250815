"""Child processes of the launcher: free ports, readiness, and stopping whole process trees.

Flower's SuperLink starts ``flower-superexec`` in a session of its own, which starts
``flwr-simulation`` (it runs the ServerApp), which starts Ray (raylet, gcs_server, one worker per
actor). A SIGTERM to the SuperLink's process group reaches none of those, and Ray's workers outlive
a killed driver: so the whole tree is collected *before* anything is signalled, every process of it
gets SIGTERM at once (the ServerApp must not go on training and publishing while its parents
wait), and whatever outlives the grace period is SIGKILLed.

Processes that left the tree (re-parented to init when a parent died) are found by their
environment instead: everything a launcher starts carries ``FEDSERVE_RUN_MARKER``
(:mod:`server.orphan_watch`), and :func:`stop_marked` stops every process carrying a given one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

#: environment variable naming the launcher whose run a process belongs to
RUN_MARKER = "FEDSERVE_RUN_MARKER"
#: seconds between SIGTERM and SIGKILL: a stop of the whole run must take ~3 s at most
STOP_GRACE_S = 2.0


def free_port() -> int:
    """A port that is free on 127.0.0.1 right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def descendants(pid: int) -> list[psutil.Process]:
    """Every live process below ``pid``, whatever session or group it moved to."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_process_group(process: subprocess.Popen[bytes], grace: float = STOP_GRACE_S) -> None:
    """Stop ``process``, its process group and every descendant (see the module docstring)."""
    stop_process_groups([process], grace)


def stop_process_groups(
    processes: Sequence[subprocess.Popen[bytes]], grace: float = STOP_GRACE_S
) -> None:
    """SIGTERM each group and every descendant at once, wait up to ``grace`` s, then SIGKILL
    every straggler."""
    tree = [child for process in processes for child in descendants(process.pid)]
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
    for child in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
    _, alive = psutil.wait_procs(tree, timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:  # the leader may be gone while its group lingers
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=grace)
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], log_file: Path, name: str, timeout: float = 60.0
) -> None:
    """Return once ``port`` accepts connections; raise if ``process`` exits or time runs out."""
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


def marked_processes(marker: str) -> list[psutil.Process]:
    """Live processes (not this one, not zombies) whose environment has ``RUN_MARKER=marker``.

    ``/proc/<pid>/environ`` is the environment a process started with, so this finds a run's
    processes however they were re-parented or whatever session they moved to.
    """
    needle = f"{RUN_MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            process = psutil.Process(int(entry.name))
            if process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (OSError, psutil.Error):
            continue
    return found


def stop_marked(marker: str, grace: float = STOP_GRACE_S) -> int:
    """SIGTERM every process carrying ``marker``, SIGKILL what is left after ``grace`` s;
    returns how many there were."""
    processes = marked_processes(marker)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=grace)
    return len(processes)
