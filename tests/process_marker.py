"""Find the processes one test started, and only those, on a machine shared with other runs.

A test puts a unique ``FEDSERVE_TEST_MARKER=<id>`` into the environment of what it starts; every
descendant inherits it (SuperLink, simulation, Ray workers, the server), so ``/proc/*/environ``
tells which processes are the test's, however they were re-parented. (Name patterns, as in
:mod:`processes`, also match other people's Flower runs on the same machine.)
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid

import psutil

from server import processes as server_processes

VARIABLE = "FEDSERVE_TEST_MARKER"


def new_marker() -> str:
    return uuid.uuid4().hex


def marked_env(marker: str, base: dict[str, str] | None = None) -> dict[str, str]:
    base = os.environ if base is None else base
    return {**base, **server_processes.marker_env(marker, VARIABLE)}


def marked_processes(marker: str) -> list[str]:
    """Command lines of live, non-zombie processes whose initial environment has the marker."""
    found = []
    for proc in server_processes.marked_processes(marker, VARIABLE):
        with contextlib.suppress(psutil.Error):
            found.append(" ".join(proc.cmdline()).strip()[:200])
    return found


def wait_until_marked_gone(marker: str, timeout: float = 20.0) -> list[str]:
    """The marked processes still alive after ``timeout`` seconds (empty is the good answer)."""
    deadline = time.monotonic() + timeout
    while (alive := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive
