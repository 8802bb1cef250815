"""Reader leases on model versions, and dead-process detection.

A lease is a file ``<model>/.in_use/<version>.<pid>.<id>`` holding ``{"pid", "host",
"created"}``. Retention keeps every version with a live lease; a lease whose process is dead on
this host is not live (and may be deleted). Leases of other hosts are always live. Callers that
create leases must hold the model's lock, so a lease can never race a deletion.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path

from serving.errors import RepositoryError
from serving.fsutil import write_fsync


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists on this host (one we may not signal counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_lease(lease_dir: Path, version: int) -> str:
    """Write a durable lease on ``version`` for this process; return its id (file name)."""
    lease_dir.mkdir(exist_ok=True)
    lease = f"{version}.{os.getpid()}.{uuid.uuid4().hex}"
    info = {"pid": os.getpid(), "host": socket.gethostname(), "created": time.time()}
    write_fsync(lease_dir / lease, json.dumps(info).encode())
    return lease


def remove_leases(lease_dir: Path, version: int, lease: str | None = None) -> None:
    """Drop one lease (``lease``) or every lease this process holds on ``version``.

    Raises RepositoryError if ``lease`` is not an id of a lease on ``version``; a lease already
    gone is not an error.
    """
    if lease is not None:
        if not lease.startswith(f"{version}.") or "/" in lease or lease.startswith("."):
            raise RepositoryError(f"lease {lease!r} is not a lease on version {version}")
        targets = [lease_dir / lease]
    else:
        targets = list(lease_dir.glob(f"{version}.{os.getpid()}.*")) if lease_dir.is_dir() else []
    for path in targets:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def live_leases(lease_dir: Path, *, drop_dead: bool) -> list[tuple[int, str]]:
    """(version, lease id) of every live lease; with ``drop_dead`` dead ones are deleted.

    An unreadable lease file is judged by the pid in its name, as if it were of this host.
    """
    if not lease_dir.is_dir():
        return []
    host = socket.gethostname()
    live = []
    for entry in lease_dir.iterdir():
        parts = entry.name.split(".")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
            continue
        try:
            info = json.loads(entry.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {"pid": int(parts[1]), "host": host}
        dead = info.get("host") == host and not pid_alive(int(info.get("pid", parts[1])))
        if dead:
            if drop_dead:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            continue
        live.append((int(parts[0]), entry.name))
    return live
