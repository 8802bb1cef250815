"""One writer per run directory: a second trainer (or a resume) is refused while one is alive.

The lock is ``flock`` on ``<run dir>/.fedserve.lock``, held for the whole run. The kernel releases
it when the holder exits however it exits (SIGKILL included), so a crash never leaves a stale
lock; the file's text (pid, host, start time) only makes the refusal say who holds it.

``fedserve-train`` takes the lock before it starts anything; the ServerApp it launches (another
process, which writes into the same directory) finds ``FEDSERVE_RUN_LOCK=<lock path>`` in its
environment and knows its launcher holds it. A ServerApp run by plain ``flwr run .`` takes the lock
itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".fedserve.lock"
HELD_BY_LAUNCHER = "FEDSERVE_RUN_LOCK"


class RunDirectoryLocked(RuntimeError):
    """Another live process holds the run directory's lock."""


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold ``run_dir``'s lock for the block (see the module docstring); yields the lock path.

    Raises :class:`RunDirectoryLocked` naming the holder when another process has it.
    """
    directory = Path(run_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    if os.environ.get(HELD_BY_LAUNCHER) == str(path):
        yield path  # our launcher holds it for us
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            raise RunDirectoryLocked(
                f"run directory {directory} is in use by {holder}; wait for that run to end or "
                "pass another hydra.run.dir / output_dir"
            ) from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0)
        previous = os.environ.get(HELD_BY_LAUNCHER)
        os.environ[HELD_BY_LAUNCHER] = str(path)  # inherited by the processes started meanwhile
        try:
            yield path
        finally:
            if previous is None:
                os.environ.pop(HELD_BY_LAUNCHER, None)
            else:
                os.environ[HELD_BY_LAUNCHER] = previous
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock
