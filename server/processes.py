"""Child processes: free ports, readiness, and stopping whole process trees.

One home for what the launcher, the demo (``scripts/``), the benchmarks and the tests all need.

Flower's SuperLink starts ``flower-superexec`` in a session of its own, which starts
``flwr-simulation`` (it runs the ServerApp), which starts Ray (raylet, gcs_server, one worker per
actor). A signal to the SuperLink's process group reaches none of those, and Ray's workers outlive
a killed driver: so the whole tree is collected *before* anything is signalled, every process of it
gets the signal at once (the ServerApp must not go on training and publishing while its parents
wait), and whatever outlives the grace period is SIGKILLed. A zombie counts as stopped (on a
machine whose PID 1 does not reap, a re-parented one stays a zombie forever).

Processes that left the tree (re-parented to init when a parent died) are found by their
environment instead: everything a launcher starts carries ``FEDSERVE_RUN_MARKER``
(:mod:`server.orphan_watch`), and :func:`stop_marked` stops every process carrying a given one and
everything below those (a process's environment as ``/proc`` shows it can lose the marker; see
:func:`marker_env`). So a launcher must not run below another run's processes: the outer sweep
would stop the inner run's orphan watch along with it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

#: environment variable naming the launcher whose run a process belongs to
RUN_MARKER = "FEDSERVE_RUN_MARKER"
#: seconds between the first signal and SIGKILL: stopping a whole run must take ~3 s at most
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


def stop_process_group(
    process: subprocess.Popen[bytes],
    grace: float = STOP_GRACE_S,
    first: int = signal.SIGTERM,
    known: Iterable[psutil.Process] = (),
) -> None:
    """Stop ``process``, its group and every descendant; see :func:`stop_process_groups`."""
    stop_process_groups([process], grace, first, known)


def stop_process_groups(
    processes: Sequence[subprocess.Popen[bytes]],
    grace: float = STOP_GRACE_S,
    first: int = signal.SIGTERM,
    known: Iterable[psutil.Process] = (),
) -> None:
    """Send ``first`` to each of ``processes`` and to everything below them at once, wait up to
    ``grace`` s, then SIGKILL every straggler.

    ``first`` goes to the process group of a process that leads one (started with
    ``start_new_session=True``), else to the process alone (one that shares our session). The
    stragglers are the groups, every descendant found before the signal, and ``known``: processes
    seen below them earlier (see ``scripts/demo_processes.ProcessTree``), which may have been
    re-parented since.
    """
    leaders = {p.pid for p in processes if _leads_group(p.pid)}
    ours = {p.pid for p in processes}
    tree = {child.pid: child for p in processes for child in descendants(p.pid)}
    for proc in known:
        if proc.pid not in ours:
            tree.setdefault(proc.pid, proc)
    for process in processes:
        if process.poll() is None:
            _signal(process, first, process.pid in leaders)
    for child in tree.values():
        with contextlib.suppress(psutil.Error):
            child.send_signal(first)
    deadline = time.monotonic() + grace
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
    alive = _wait_gone(list(tree.values()), deadline - time.monotonic())
    for process in processes:
        if process.poll() is None:
            logger.warning(
                "%s (pid %d) did not stop within %g s of signal %d: killing it",
                _name(process),
                process.pid,
                grace,
                first,
            )
        # the leader may be gone while its group lingers
        _signal(process, signal.SIGKILL, process.pid in leaders)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    _wait_gone(alive, grace)
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)


def _leads_group(pid: int) -> bool:
    """Whether ``pid`` leads its process group; True for a reaped process, whose group may
    linger (as before, a signal to a group that no longer exists is a no-op)."""
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return True


def _signal(process: subprocess.Popen[bytes], signum: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(process.pid, signum)
        elif process.poll() is None:
            process.send_signal(signum)


def _wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Poll until every process of ``procs`` has exited or is a zombie, or ``timeout`` passes;
    returns those still running."""
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        alive = [p for p in procs if _running(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.name()}({proc.pid})"
    except psutil.Error:
        return f"?({proc.pid})"


def _name(process: subprocess.Popen[bytes]) -> str:
    args = process.args
    if isinstance(args, list | tuple) and args:
        args = args[0]
    return Path(os.fsdecode(args)).name  # type: ignore[arg-type]


def _with_descendants(procs: list[psutil.Process]) -> list[psutil.Process]:
    """``procs`` and every live process below them, each once, never this process."""
    family = {proc.pid: proc for proc in procs}
    for proc in procs:
        # the listed object: psutil refuses it if its pid was reused since
        with contextlib.suppress(psutil.Error):
            for child in proc.children(recursive=True):
                family.setdefault(child.pid, child)
    family.pop(os.getpid(), None)
    return [proc for proc in family.values() if _running(proc)]


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


def marker_env(marker: str, variable: str = RUN_MARKER) -> dict[str, str]:
    """The variables that mark a process, and everything it starts, as carrying ``marker``.

    By default setproctitle (Ray titles its workers and agents with it) uses the memory
    ``/proc/<pid>/environ`` reads as room for the title and clears it, so a titled process's
    environment can lose the marker: Ray's ``ray::DashboardAgent`` was seen here with both of
    two markers, with neither, and in CI with the test's but not the run's, so the orphan
    watch's sweep missed it. ``SPT_NOENV`` confines the title to argv's space.
    """
    return {variable: marker, "SPT_NOENV": "1"}


def marked_processes(marker: str, variable: str = RUN_MARKER) -> list[psutil.Process]:
    """Live processes (not this one, not zombies) whose environment has ``variable=marker``.

    ``/proc/<pid>/environ`` is the environment a process started with, so this finds a run's
    processes however they were re-parented or whatever session they moved to.
    """
    needle = f"{variable}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            proc = psutil.Process(int(entry.name))
        except (OSError, psutil.Error):
            continue
        if _running(proc):
            found.append(proc)
    return found


def stop_marked(marker: str, grace: float = STOP_GRACE_S, sweeps: int = 5) -> list[str]:
    """SIGTERM every process carrying ``marker`` and every descendant of one, SIGKILL what is
    left after ``grace`` s, and sweep again until a sweep finds none (at most ``sweeps`` times);
    returns ``name(pid)`` of each process it stopped.

    Descendants count even when their environment does not show the marker (a process may have
    overwritten it; see :func:`marker_env`). One sweep is not enough: a process alive while the
    first is listed can start more processes before it dies, and those were not in the list.
    """
    stopped: list[str] = []
    for _ in range(sweeps):
        procs = _with_descendants(marked_processes(marker))
        if not procs:
            break
        stopped.extend(_describe(proc) for proc in procs)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        alive = _wait_gone(procs, grace)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        _wait_gone(alive, grace)
    else:
        left = _with_descendants(marked_processes(marker))
        if left:
            logger.warning(
                "%d process(es) carrying %s=%s, or below one, still running after %d sweeps: %s",
                len(left),
                RUN_MARKER,
                marker,
                sweeps,
                ", ".join(str(p.pid) for p in left),
            )
    return stopped
