"""The trainer's guards: the orphan watch, the run-directory lock, and a lost log stream."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from server import launcher
from server.launcher import SuperLink
from server.run_lock import HELD_BY_LAUNCHER, RunDirectoryLocked, run_lock

LAUNCHER = """
import os, subprocess, time
from server.orphan_watch import OrphanWatch
watch = OrphanWatch()
env = {**os.environ, **watch.env()}
child = subprocess.Popen(["sleep", "300"], env=env, start_new_session=True)
print(child.pid, flush=True)
time.sleep(300)
"""


def test_the_orphan_watch_stops_what_a_sigkilled_launcher_started() -> None:
    root = Path(__file__).resolve().parents[1]
    parent = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child = psutil.Process(int(parent.stdout.readline()))
    assert child.is_running()
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    # the child is in a session of its own: only the watch can have stopped it
    gone, alive = psutil.wait_procs([child], timeout=20)
    assert alive == [], "the orphan watch left the child running"


def test_the_orphan_watch_exits_when_closed(tmp_path: Path) -> None:
    from server.orphan_watch import OrphanWatch

    with OrphanWatch() as watch:
        assert watch.process.poll() is None
    assert watch.process.returncode == 0


def test_a_second_holder_of_a_run_directory_is_refused(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from server.run_lock import run_lock\n"
            f"with run_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)",
        ],
        cwd=Path(__file__).resolve().parents[1],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryLocked, match=f"in use by pid {holder.pid} on "):
            with run_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(tmp_path):  # the kernel released the dead holder's lock
        pass


def test_the_launchers_lock_is_inherited_not_taken_twice(tmp_path: Path) -> None:
    with run_lock(tmp_path) as path:
        assert os.environ[HELD_BY_LAUNCHER] == str(path)
        with run_lock(tmp_path):  # the ServerApp under our launcher: no deadlock, no refusal
            pass
    assert HELD_BY_LAUNCHER not in os.environ


def _link(tmp_path: Path) -> SuperLink:
    return SuperLink(process=None, flwr_home=tmp_path, address="x", log_file=tmp_path / "log")  # type: ignore[arg-type]


def test_a_lost_log_stream_waits_for_the_run_instead_of_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    statuses = iter(["running", "running", "finished:completed", "finished:completed"])
    monkeypatch.setattr(launcher, "_run_and_tee", lambda command, env, timeout: (1, [42]))
    monkeypatch.setattr(
        SuperLink, "runs", lambda self, run_id=None: [{"run-id": run_id, "status": next(statuses)}]
    )
    monkeypatch.setattr(time, "sleep", lambda s: None)
    assert _link(tmp_path).run({}) == 42


def test_a_failed_flwr_run_without_a_run_id_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launcher, "_run_and_tee", lambda command, env, timeout: (1, []))
    with pytest.raises(RuntimeError, match="`flwr run` exited with 1"):
        _link(tmp_path).run({})


def test_a_lost_log_stream_still_reports_a_failed_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(launcher, "_run_and_tee", lambda command, env, timeout: (1, [7]))
    monkeypatch.setattr(
        SuperLink,
        "runs",
        lambda self, run_id=None: [
            {"run-id": 7, "status": "finished:failed", "status-details": "boom"}
        ],
    )
    with pytest.raises(launcher.RunFailedError, match="boom"):
        _link(tmp_path).run({})
