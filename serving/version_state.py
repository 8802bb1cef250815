"""Writer bookkeeping inside one model directory: the version counter and crashed-writer leftovers.

``<model>/.fedserve_state.json`` records the highest version ever published, so a version number
is never reused even after retention deleted it. ``.tmp-<pid>-*`` entries are versions (or
files) being written or deleted; those of dead or this process, or older than a bound, are
leftovers of a crash. Call these with the model's lock held.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from serving.errors import RepositoryError
from serving.fsutil import atomic_write, remove_path
from serving.layout import (
    LEGACY_LEASE_DIR,
    STATE_FILE,
    TMP_PREFIX,
    TMP_RE,
    VERSION_RE,
    validate_version,
)
from serving.leases import pid_alive

log = logging.getLogger(__name__)


def read_state(mdir: Path) -> dict[str, Any]:
    """The model's state file as a dict; ``{}`` if missing or unreadable (logged)."""
    try:
        return json.loads((mdir / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", mdir / STATE_FILE, exc)
        return {}


def record_version(mdir: Path, version: int) -> None:
    """Raise the recorded highest version to ``version`` (never lowers it); atomic write."""
    state = read_state(mdir)
    state["max_version"] = max(int(state.get("max_version", 0)), version)
    atomic_write(mdir / STATE_FILE, json.dumps(state).encode(), tmp_prefix=TMP_PREFIX)


def next_version(mdir: Path) -> int:
    """``max(existing version dirs, highest recorded, 0) + 1``."""
    numbers = [int(e.name) for e in mdir.iterdir() if VERSION_RE.match(e.name)]
    recorded = read_state(mdir).get("max_version", 0)
    recorded = recorded if isinstance(recorded, int) else 0
    return max([0, recorded, *numbers]) + 1


def chosen_version(name: str, requested: int | None, following: int) -> int:
    """The version to publish: ``following`` (the next free), or ``requested`` when given, which
    must not be below it (versions only grow; RepositoryError)."""
    if requested is None:
        return following
    if validate_version(requested) < following:
        raise RepositoryError(
            f"cannot publish {name!r} version {requested}: version {following - 1} or higher "
            "was published before (versions only grow)"
        )
    return requested


def clean_tmp(mdir: Path, stale_seconds: float) -> None:
    """Remove leftovers of crashed publishes/deletions, and the leases directory of earlier
    fedserve versions. Called with the model's lock held, so no live writer owns a temp entry;
    the pid/age checks are a second safety net."""
    now = time.time()
    if (mdir / LEGACY_LEASE_DIR).is_dir():
        log.info("removing %s: leases now live in the repository root", mdir / LEGACY_LEASE_DIR)
        remove_path(mdir / LEGACY_LEASE_DIR)
    for entry in mdir.iterdir():
        match = TMP_RE.match(entry.name)
        if not match:
            continue
        pid = int(match.group(1))
        try:
            age = now - entry.lstat().st_mtime
        except FileNotFoundError:
            continue
        if pid == os.getpid() or not pid_alive(pid) or age > stale_seconds:
            log.info("removing leftover %s", entry)
            remove_path(entry)
