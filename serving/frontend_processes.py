"""The engine process's front-end processes (``serving.frontends``): started, kept up, stopped.

Each is ``python -m serving.frontend_worker <link socket>`` in a session of its own (a terminal's
Ctrl-C reaches the engine process alone, which stops them in order), with this process's
environment (its run marker too: :func:`server.processes.stop_marked` finds them). They reach the
dataplane through one :class:`~serving.dataplane_link.LinkServer` on a Unix socket in a private
directory. :meth:`FrontendProcesses.start` returns once every one listens; one that exits while
the server runs is logged and started again (after 1 s, doubling up to 30 s while replacements
keep dying within :data:`STABLE_S`); :meth:`FrontendProcesses.stop` sends SIGTERM (each drains
its requests in flight, which still run on this process's engines) and SIGKILL to any left after
the drain timeout. A SIGKILL goes to the process's whole group, so the helper processes it
started (big-JSON decoders) go with it; so does a group whose leader died. A front-end process
whose link closes (this process died) exits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from serving.dataplane import DataPlane
from serving.dataplane_link import LinkServer
from serving.errors import PortUnavailable

log = logging.getLogger(__name__)

#: how long the front-end processes may take to listen (imports, binding)
START_TIMEOUT_S = 60.0
#: how often a front-end process's exit is looked for
POLL_S = 0.2
#: the wait before a dead front-end process is replaced, doubled (up to the most) while the
#: replacements keep dying within STABLE_S of their start
RESTART_DELAY_S = 1.0
RESTART_DELAY_MAX_S = 30.0
STABLE_S = 30.0


def check_port_free(host: str, port: int, what: str, fix: str) -> None:
    """:class:`PortUnavailable` when ``host:port`` is in use. A socket bound with SO_REUSEPORT
    joins others bound so by the same user, so binding the shared ports proves nothing: this
    binds without it first (port 0: nothing to check). A check, not a lock: two servers doing
    this at the same instant could both pass it."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            probe.listen(1)
        except OSError as exc:
            raise PortUnavailable(
                f"cannot listen for {what} on {host}:{port}: {exc.strerror or exc}; pass {fix}"
            ) from None


class FrontendProcesses:
    """``count`` front-end processes serving ``config`` (its ports already bound here, with
    SO_REUSEPORT) over ``dataplane`` (see the module)."""

    def __init__(self, count: int, dataplane: DataPlane, config: Any) -> None:
        self.count = count
        self._directory = tempfile.mkdtemp(prefix="fedserve-link-")  # mode 0700
        self.link = LinkServer(dataplane, os.path.join(self._directory, "link"), config)
        self.processes: list[subprocess.Popen[bytes]] = []
        self._started_at: dict[int, float] = {}
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None

    @property
    def pids(self) -> set[int]:
        return {p.pid for p in self.processes}

    async def start(self, stop: asyncio.Event) -> None:
        """Start them; return once every one listens, or once ``stop`` is set (a signal while
        they start); RuntimeError naming the exit status of one that exits first, or after
        :data:`START_TIMEOUT_S`."""
        await self.link.start()
        self.processes = [self._spawn() for _ in range(self.count)]
        listening = asyncio.ensure_future(self.link.wait_listening(lambda: self.pids))
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while not listening.done():
                if stop.is_set():
                    listening.cancel()
                    return
                for process in self.processes:
                    if process.poll() is not None:
                        raise RuntimeError(
                            f"front-end process {process.pid} exited with {process.returncode} "
                            "before it listened (its log is above); serving.frontends=1 serves "
                            "from this process alone"
                        )
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"front-end processes did not listen within {START_TIMEOUT_S:.0f} s"
                    )
                await asyncio.wait({listening}, timeout=POLL_S)
        except BaseException:
            listening.cancel()
            await self.stop(0)
            raise
        self._watch = asyncio.ensure_future(self._keep_up())
        log.info("%d front-end processes listen: %s", self.count, sorted(self.pids))

    def _spawn(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "serving.frontend_worker", self.link.path],
            start_new_session=True,  # its own group: see the module
        )
        self._started_at[process.pid] = time.monotonic()
        return process

    async def _keep_up(self) -> None:
        delays = [RESTART_DELAY_S] * len(self.processes)
        while not self._stopping:
            await asyncio.sleep(POLL_S)
            for i, process in enumerate(self.processes):
                if process.poll() is None or self._stopping:
                    continue
                _kill_group(process.pid)  # what it started, if it did not stop them itself
                lived = time.monotonic() - self._started_at.pop(process.pid, 0.0)
                if lived >= STABLE_S:
                    delays[i] = RESTART_DELAY_S
                delay, delays[i] = delays[i], min(2 * delays[i], RESTART_DELAY_MAX_S)
                log.warning(
                    "front-end process %d exited with %s after %.0f s; starting another in %.0f s",
                    process.pid,
                    process.returncode,
                    lived,
                    delay,
                )
                await asyncio.sleep(delay)
                if not self._stopping:
                    self.processes[i] = self._spawn()

    def kill(self) -> None:
        """SIGKILL every one and what it started (a second Ctrl-C)."""
        self._stopping = True
        for process in self.processes:
            _kill_group(process.pid)

    async def stop(self, drain_timeout_s: float) -> None:
        """SIGTERM each; wait for them to drain (at most ``drain_timeout_s`` + 5 s), SIGKILL what
        is left, close the link. Idempotent."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + drain_timeout_s + 5.0
        while any(p.poll() is None for p in self.processes) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for process in self.processes:
            if process.poll() is None:
                log.warning("front-end process %d did not stop; killing it", process.pid)
            _kill_group(process.pid)
            process.wait()
        await self.link.close()
        shutil.rmtree(self._directory, ignore_errors=True)


def _kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (a front-end process and what it started)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
