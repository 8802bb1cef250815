"""Leases carry host, pid and an expiry the holder renews: a dead holder's lease expires (one of
another host no longer pins a version forever), leases stay out of the model directories Triton
reads, and a server removes its own leases on shutdown."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from repository_helpers import publish

from serving.errors import RepositoryError
from serving.leases import LeaseHolder, lease_is_live
from serving.repository import ModelRepository


@pytest.fixture
def repo(tmp_path: Path) -> ModelRepository:
    repo = ModelRepository(tmp_path / "repo")
    for seed in range(4):
        publish(repo, tmp_path, seed=seed)
    return repo


def lease_files(repo: ModelRepository) -> list[Path]:
    return sorted(p for p in repo.root.iterdir() if p.name.startswith(".lease-"))


def test_lease_file_names_host_pid_expiry_and_lives_in_the_root(repo: ModelRepository) -> None:
    before = {p: p.stat().st_mtime_ns for p in (repo.root / "tiny").iterdir()}
    lease = repo.mark_in_use("tiny", 2)
    repo.mark_in_use("tiny", 3)
    [path] = lease_files(repo)
    doc = json.loads(path.read_text())
    assert doc["host"] == socket.gethostname() and doc["pid"] == os.getpid()
    assert doc["versions"] == {"tiny": [2, 3]}
    assert time.time() < doc["expires"] <= time.time() + 60
    # nothing in the model directory changed: Triton sees no version dir and no model change
    assert {p: p.stat().st_mtime_ns for p in (repo.root / "tiny").iterdir()} == before
    assert repo.leased_versions("tiny") == {2, 3}
    repo.release("tiny", 2, lease)
    assert json.loads(path.read_text())["versions"] == {"tiny": [3]}
    with pytest.raises(RepositoryError, match="not a lease on tiny version 3"):
        repo.release("tiny", 3, lease)
    repo.release("tiny", 3)
    assert lease_files(repo) == []  # the last lease gone, so is the file


def test_release_all_removes_this_holders_leases_only(repo: ModelRepository) -> None:
    other = ModelRepository(repo.root)  # another server on the same repository
    other.mark_in_use("tiny", 1)
    repo.mark_in_use("tiny", 2)
    repo.mark_in_use("tiny", 4)
    repo.release_all()
    repo.release_all()  # idempotent
    assert repo.leased_versions("tiny") == {1}
    assert len(lease_files(repo)) == 1
    other.release_all()
    assert lease_files(repo) == []


def write_foreign_lease(repo: ModelRepository, name: str, expires: float) -> Path:
    path = repo.root / name
    doc = {"host": "another-host", "pid": 1, "expires": expires, "versions": {"tiny": [1]}}
    path.write_text(json.dumps(doc))
    return path


def test_lease_of_another_host_is_live_until_it_expires(repo: ModelRepository) -> None:
    live = write_foreign_lease(repo, ".lease-another-host-1-a.json", time.time() + 600)
    assert repo.leased_versions("tiny") == {1}
    assert repo.apply_retention("tiny", keep_last=1) == [2, 3]
    live.unlink()
    dead = write_foreign_lease(repo, ".lease-another-host-1-b.json", time.time() - 1)
    assert repo.leased_versions("tiny") == set()
    assert repo.apply_retention("tiny", keep_last=1) == [1]
    assert not dead.exists()  # retention removed the expired lease


def test_holder_renews_its_expiry(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "repo", lease_ttl_s=0.6)
    publish(repo, tmp_path)
    repo.mark_in_use("tiny", 1)
    [path] = lease_files(repo)
    first = json.loads(path.read_text())["expires"]
    deadline = time.monotonic() + 10
    while json.loads(path.read_text())["expires"] == first:
        assert time.monotonic() < deadline, "the lease was never renewed"
        time.sleep(0.05)
    assert repo.leased_versions("tiny") == {1}
    repo.release_all()


def test_liveness_rules() -> None:
    now, host = 1000.0, socket.gethostname()
    mine = {"host": host, "pid": os.getpid(), "expires": now + 5}
    assert lease_is_live(mine, now, host)
    assert not lease_is_live({**mine, "expires": now - 1}, now, host)
    assert not lease_is_live({**mine, "pid": 2**22 + 12345}, now, host)  # dead pid, this host
    assert lease_is_live({**mine, "host": "elsewhere", "pid": 2**22 + 12345}, now, host)
    assert not lease_is_live({"host": host, "pid": os.getpid()}, now, host)  # no expiry


def test_failed_lease_write_leases_nothing(tmp_path: Path) -> None:
    class Broken:
        def write_lease(self, name: str, data: bytes) -> None:
            raise OSError("read-only file system")

        def remove_lease(self, name: str) -> None:
            raise FileNotFoundError(name)

        def lease_files(self):
            return []

    holder = LeaseHolder(Broken(), ttl_s=5)
    with pytest.raises(OSError, match="read-only"):
        holder.acquire("tiny", 1)
    assert holder.held() == set()


def test_publish_removes_the_old_leases_directory(repo: ModelRepository, tmp_path: Path) -> None:
    legacy = repo.root / "tiny" / ".in_use"
    legacy.mkdir()
    (legacy / "1.123.abc").write_text("{}")
    publish(repo, tmp_path, seed=9)
    assert not legacy.exists()
