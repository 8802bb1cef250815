"""server/processes.py: the one free-port helper and the one process-tree stopper (the launcher,
the demo, the benchmarks and the tests all use them)."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import psutil
import pytest
from process_marker import marked_processes

from server.processes import (
    RUN_MARKER,
    _wait_gone,
    free_port,
    marker_env,
    stop_marked,
    stop_process_group,
)
from server.processes import marked_processes as server_marked_processes

# Starts a grandchild in a session of its own (as the SuperLink starts flower-superexec), prints
# its pid, then waits; ``IGNORE_TERM`` makes the leader ignore SIGTERM.
TREE = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    if "ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "report-int" in sys.argv:
        def on_int(signum, frame):
            print("got SIGINT", flush=True)
            sys.exit(3)
        signal.signal(signal.SIGINT, on_int)
    grandchild = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True
    )
    print(grandchild.pid, flush=True)
    time.sleep(300)
    """
)


def _start(*flags: str, new_session: bool = True) -> tuple[subprocess.Popen[bytes], int]:
    process = subprocess.Popen(
        [sys.executable, "-c", TREE, *flags],
        stdout=subprocess.PIPE,
        start_new_session=new_session,
    )
    assert process.stdout is not None
    return process, int(process.stdout.readline())


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_free_port_is_bindable_on_localhost() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_a_group_and_a_descendant_in_another_session_are_stopped(process_marker: str) -> None:
    process, grandchild = _start()
    stop_process_group(process, grace=2.0)
    assert process.returncode == -signal.SIGTERM
    assert _gone(grandchild)
    assert marked_processes(process_marker) == []


def test_a_leader_ignoring_the_first_signal_is_killed_after_grace(
    process_marker: str, caplog: pytest.LogCaptureFixture
) -> None:
    process, grandchild = _start("ignore-term")
    with caplog.at_level(logging.WARNING, logger="server.processes"):
        stop_process_group(process, grace=0.5)
    assert process.returncode == -signal.SIGKILL
    assert _gone(grandchild)
    assert f"(pid {process.pid}) did not stop within 0.5 s of signal 15: killing it" in caplog.text
    assert marked_processes(process_marker) == []


def test_a_process_in_our_session_gets_the_signal_itself(process_marker: str) -> None:
    """Not a group leader (the benchmarks keep their servers in their own session): ``first``
    goes to the process, not to a group (killpg of our own group would hit pytest)."""
    process, grandchild = _start("report-int", new_session=False)
    stop_process_group(process, grace=2.0, first=signal.SIGINT)
    assert process.returncode == 3
    assert process.stdout is not None and process.stdout.read() == b"got SIGINT\n"
    assert _gone(grandchild)
    assert marked_processes(process_marker) == []


def test_known_processes_are_stopped_after_their_parent_is_gone(process_marker: str) -> None:
    """A descendant seen earlier whose parent has exited is no longer below the process."""
    process, grandchild = _start()
    known = [psutil.Process(grandchild)]
    subprocess.run(["kill", "-KILL", str(process.pid)], check=True)
    process.wait(10)
    stop_process_group(process, grace=2.0, known=known)
    assert _gone(grandchild)
    assert marked_processes(process_marker) == []


def test_a_zombie_counts_as_stopped() -> None:
    zombie = subprocess.Popen(["true"])
    proc = psutil.Process(zombie.pid)
    deadline = time.monotonic() + 10
    while proc.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert _wait_gone([proc], timeout=0.0) == []
    finally:
        zombie.wait()


# On SIGTERM, starts one more process in a session of its own, prints its pid, then exits.
SPAWN_ON_TERM = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    def on_term(signum, frame):
        late = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True
        )
        print(late.pid, flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print("ready", flush=True)
    time.sleep(300)
    """
)


def test_stop_marked_also_stops_what_a_marked_process_starts_while_dying() -> None:
    marker = uuid.uuid4().hex
    env = {**os.environ, RUN_MARKER: marker}
    spawner = subprocess.Popen(
        [sys.executable, "-c", SPAWN_ON_TERM],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert spawner.stdout is not None and spawner.stdout.readline().strip() == "ready"
    late_pid = 0
    try:
        assert len(stop_marked(marker, grace=2.0)) >= 2
        late_pid = int(spawner.stdout.readline())
        spawner.wait(10)
        assert _gone(late_pid), "the process started during the first sweep survived"
        assert server_marked_processes(marker) == []
    finally:
        spawner.kill()
        spawner.wait()
        if late_pid and not _gone(late_pid):
            os.kill(late_pid, signal.SIGKILL)


# Starts a child in a session of its own that zeroes its environment block (what setproctitle
# does to the block it takes for the title), prints the child's pid, then waits.
CHILD_CLEARS_ITS_ENVIRONMENT = textwrap.dedent(
    """
    import subprocess, sys, time
    CLEAR = (
        "import ctypes, time\\n"
        "stat = open('/proc/self/stat').read().rsplit(')', 1)[1].split()\\n"
        "start, end = int(stat[47]), int(stat[48])\\n"  # fields 50, 51: env_start, env_end
        "ctypes.memset(start, 0, end - start)\\n"
        "print('cleared', flush=True)\\n"
        "time.sleep(300)\\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", CLEAR], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert child.stdout.readline().strip() == "cleared"
    print(child.pid, flush=True)
    time.sleep(300)
    """
)


def test_stop_marked_stops_a_descendant_whose_environment_no_longer_shows_the_marker() -> None:
    marker = uuid.uuid4().hex
    parent = subprocess.Popen(
        [sys.executable, "-c", CHILD_CLEARS_ITS_ENVIRONMENT],
        env={**os.environ, RUN_MARKER: marker},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    try:
        assert [p.pid for p in server_marked_processes(marker)] == [parent.pid]  # child unseen
        stopped = stop_marked(marker, grace=2.0)
        parent.wait(10)
        assert _gone(child_pid), f"the child survived; stopped: {stopped}"
        assert len(stopped) == 2
    finally:
        parent.kill()
        parent.wait()
        if not _gone(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def test_a_process_titled_as_ray_titles_its_agents_keeps_its_marker() -> None:
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "SPT_NOENV"}
    titled = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from ray._raylet import setproctitle; "
            "setproctitle('ray::DashboardAgent'); print('titled', flush=True); time.sleep(300)",
        ],
        env={**env, **marker_env(marker)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert titled.stdout is not None
    try:
        assert titled.stdout.readline().strip() == "titled"
        assert psutil.Process(titled.pid).cmdline()[0] == "ray::DashboardAgent"
        assert [p.pid for p in server_marked_processes(marker)] == [titled.pid]
    finally:
        titled.kill()
        titled.wait()
