"""Which Flower / Ray / server processes are alive (to prove a run left nothing behind)."""

from __future__ import annotations

import time

import psutil

PATTERNS = (
    "flower-superlink",
    "flower-superexec",
    "flower-supernode",
    "flwr-simulation",
    "flwr-serverapp",
    "flwr-clientapp",
    "raylet",
    "gcs_server",
    "fedserve-serve",
    "ray::",
)


def flower_processes(since: float) -> list[str]:
    """Command lines of matching processes started at or after ``since`` (epoch seconds)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "create_time", "status"]):
        try:
            if proc.info["create_time"] < since - 1 or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(p in cmdline for p in PATTERNS):
            found.append(cmdline[:200])
    return found


def wait_until_gone(since: float, timeout: float = 20.0) -> list[str]:
    """Processes still alive after ``timeout`` seconds (an empty list is the good answer)."""
    deadline = time.monotonic() + timeout
    while (alive := flower_processes(since)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive
