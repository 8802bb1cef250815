"""Reader leases on model versions: one renewed, expiring lease file per holder process.

A process that serves versions of a repository holds one file in the repository's root,
``.lease-<host>-<pid>-<token>.json``::

    {"host": "node-3", "pid": 4242, "expires": 1767225600.0, "versions": {"digits": [7, 8]}}

Retention keeps every version named by a live lease. A lease is live until ``expires`` (the
holder rewrites the file with a new expiry every ``ttl_s / 3`` while it holds anything), and a
lease of this host whose process is gone is dead at once; so a holder that died on another host
stops protecting its versions ``ttl_s`` after its last renewal, instead of forever. Expiry is the
holder's wall clock: hosts sharing a repository need clocks within a small part of ``ttl_s``.

The files lie in the root, not in a model directory: Triton takes every sub-directory of a model
directory for a version ("ignore version directory '.in_use'") and, in poll mode, every change in
a model directory for a model change; it lists only directories of the root, so files there are
invisible to it. Where the bytes go (a local directory, an object store) is a
:class:`LeaseFiles`; callers that create leases on a local repository hold the model's lock, so a
lease can never race a deletion.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any, Protocol

from serving.errors import RepositoryError

log = logging.getLogger(__name__)

LEASE_PREFIX = ".lease-"
LEASE_SUFFIX = ".json"
#: a dead holder's lease protects its versions this long after its last renewal
DEFAULT_TTL_S = 60.0


class LeaseFiles(Protocol):
    """Where lease files live (the repository root): write atomically, remove, list."""

    def write_lease(self, name: str, data: bytes) -> None: ...

    def remove_lease(self, name: str) -> None: ...

    def lease_files(self) -> Iterable[tuple[str, bytes]]: ...


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


def is_lease_file(name: str) -> bool:
    return name.startswith(LEASE_PREFIX) and name.endswith(LEASE_SUFFIX)


def lease_is_live(doc: dict[str, Any], now: float, host: str) -> bool:
    """Not expired, and not of a dead process of this host."""
    expires = doc.get("expires")
    if not isinstance(expires, int | float) or expires <= now:
        return False
    pid = doc.get("pid")
    return not (doc.get("host") == host and isinstance(pid, int) and not pid_alive(pid))


def read_leases(files: LeaseFiles) -> list[tuple[str, dict[str, Any] | None]]:
    """(file name, parsed document or None when unreadable) of every lease file."""
    out: list[tuple[str, dict[str, Any] | None]] = []
    for name, data in files.lease_files():
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        out.append((name, doc if isinstance(doc, dict) else None))
    return out


def live_versions(files: LeaseFiles, model: str, *, drop_dead: bool = False) -> set[int]:
    """Versions of ``model`` named by a live lease; with ``drop_dead`` the files of dead or
    expired leases are deleted (an unreadable file is left alone: it may be mid-write)."""
    now, host = time.time(), socket.gethostname()
    versions: set[int] = set()
    for name, doc in read_leases(files):
        if doc is None:
            continue
        if not lease_is_live(doc, now, host):
            if drop_dead:
                log.info("removing the dead lease %s", name)
                with contextlib.suppress(FileNotFoundError):
                    files.remove_lease(name)
            continue
        held = (doc.get("versions") or {}).get(model) or []
        versions |= {int(v) for v in held if isinstance(v, int)}
    return versions


class LeaseHolder:
    """This process's leases in one repository, kept in one file renewed by a daemon thread.

    :meth:`acquire` / :meth:`release` add and drop one lease (a lease id names model and
    version); the file is rewritten on each change and every ``ttl_s / 3`` while any lease is
    held, and removed when the last one is released or by :meth:`release_all` (what a server
    calls on shutdown). A failed renewal is logged and retried at the next tick.
    """

    def __init__(self, files: LeaseFiles, ttl_s: float = DEFAULT_TTL_S) -> None:
        if not ttl_s > 0:
            raise ValueError(f"lease ttl_s must be > 0, got {ttl_s}")
        self.files = files
        self.ttl_s = float(ttl_s)
        host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64]
        self.name = f"{LEASE_PREFIX}{host}-{os.getpid()}-{uuid.uuid4().hex[:12]}{LEASE_SUFFIX}"
        self._leases: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, model: str, version: int) -> str:
        """Lease ``version`` of ``model``; the file is durable before this returns."""
        lease = f"{model}:{version}:{uuid.uuid4().hex[:12]}"
        with self._lock:
            self._leases[lease] = (model, version)
            try:
                self._write()
            except BaseException:
                del self._leases[lease]
                raise
            self._start_renewal()
        return lease

    def release(self, model: str, version: int, lease: str | None = None) -> None:
        """Drop ``lease``, or every lease of this holder on ``version``. A lease already gone is
        not an error; an id of another model or version is (RepositoryError)."""
        if lease is not None and not lease.startswith(f"{model}:{version}:"):
            raise RepositoryError(f"lease {lease!r} is not a lease on {model} version {version}")
        with self._lock:
            gone = (
                [lease]
                if lease is not None
                else [k for k, held in self._leases.items() if held == (model, version)]
            )
            if not any(k in self._leases for k in gone):
                return
            for key in gone:
                self._leases.pop(key, None)
            self._sync()

    def hold_exactly(self, pairs: set[tuple[str, int]]) -> None:
        """Hold one lease on each (model, version) of ``pairs`` and none other (one write)."""
        with self._lock:
            previous = dict(self._leases)
            self._leases = {f"{m}:{v}:{uuid.uuid4().hex[:12]}": (m, v) for m, v in sorted(pairs)}
            try:
                self._sync()
            except BaseException:
                self._leases = previous
                raise
            self._start_renewal()

    def release_all(self) -> None:
        """Drop every lease of this holder and delete its file (idempotent)."""
        with self._lock:
            self._leases.clear()
            self._sync()
        self._wake.set()

    def held(self) -> set[tuple[str, int]]:
        with self._lock:
            return set(self._leases.values())

    def document(self) -> dict[str, Any]:
        versions: dict[str, list[int]] = {}
        for model, version in sorted(set(self._leases.values())):
            versions.setdefault(model, []).append(version)
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "expires": time.time() + self.ttl_s,
            "versions": versions,
        }

    def _start_renewal(self) -> None:
        if self._leases and (self._thread is None or not self._thread.is_alive()):
            self._thread = threading.Thread(target=self._renew, name="lease-renewal", daemon=True)
            self._thread.start()

    def _write(self) -> None:
        self.files.write_lease(self.name, json.dumps(self.document()).encode())

    def _sync(self) -> None:
        if self._leases:
            self._write()
        else:
            with contextlib.suppress(FileNotFoundError):
                self.files.remove_lease(self.name)

    def _renew(self) -> None:
        while True:
            self._wake.wait(self.ttl_s / 3)
            self._wake.clear()
            with self._lock:
                if not self._leases:
                    self._thread = None
                    return
                try:
                    self._write()
                except Exception as exc:  # noqa: BLE001 - retried at the next tick
                    log.warning("cannot renew the lease %s: %s", self.name, exc)
