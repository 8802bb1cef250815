"""A versioned ONNX model repository in NVIDIA Triton's layout, on a local (or mounted) file system.

Layout (Triton loads it unchanged; it ignores the dot-names and the files of the root)::

    <root>/<model>/config.pbtxt                 Triton ModelConfig (protobuf text format)
    <root>/<model>/<version>/model.onnx         version = 1, 2, 3, ... (never reused)
    <root>/<model>/<version>/model.onnx.data    only for models saved with ONNX external data
    <root>/<model>/<version>/metadata.json      ours: version, round, metrics, sha256 of files, ...
    <root>/<model>/.fedserve_state.json         highest version ever published
    <root>/<model>/.lock                        flock(2) serialising writers of this model
    <root>/<model>/.tmp-<pid>-<id>              a version being written, or being deleted
    <root>/.lease-<host>-<pid>-<id>.json        a reader's leases (:mod:`serving.leases`)

Guarantees:

* **Atomic publish.** A version is written completely into a ``.tmp-*`` directory inside the
  model directory, every file and the directory are fsync'ed, and it appears by one
  ``rename(2)`` to ``<version>`` (then the parent is fsync'ed). A reader never sees half of a
  version. A crash before the rename leaves only the ``.tmp-*`` directory; the next publish (which
  holds the model's lock, so no live writer can own it) deletes it.
* **Versions only grow.** The next version is ``max(existing, highest ever recorded) + 1``;
  retention deleting the newest-ever version does not let its number be reused.
* **A person's config.pbtxt stays theirs.** Publishing changes only the fields derived from the
  model (:func:`serving.model_config.merge_published`); a file already in agreement is not
  rewritten, and a file protobuf rejects refuses the publish.
* **Leases.** :meth:`ModelRepository.mark_in_use` records a lease that expires unless renewed
  (:mod:`serving.leases`); retention never deletes a version with a live lease.
* **Failures change nothing already published.** Bad names, bad files, a checksum mismatch or a
  crash mid-publish leave existing versions and their files intact.

This module holds the writers (publish, leases, retention); the read side is
:mod:`serving.repository_reader`, what a version is made of :mod:`serving.staging`, the names
:mod:`serving.layout`, durable file primitives :mod:`serving.fsutil`, leases
:mod:`serving.leases` and the version counter :mod:`serving.version_state`. A repository on an
object store is :mod:`serving.store_repository`. Needs only the standard library, numpy, onnx
and protobuf (no torch, no flwr).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Unpack

from serving.errors import RepositoryError
from serving.fsutil import atomic_write, exclusive_lock, fsync_dir
from serving.layout import CONFIG_FILE, LOCK_FILE, TMP_PREFIX, validate_version
from serving.leases import DEFAULT_TTL_S, LeaseHolder, is_lease_file, live_versions
from serving.repository_reader import RepositoryReader
from serving.staging import PublishOptions, prepare_version, updated_config, write_version
from serving.version_state import chosen_version, clean_tmp, next_version, record_version

log = logging.getLogger(__name__)


def _rename_into_place(src: Path, dst: Path) -> None:
    """The commit point of a publish (a separate function so a crash test can stop here)."""
    os.rename(src, dst)


class ModelRepository(RepositoryReader):
    """A Triton-layout model repository rooted at ``root`` (created on first publish).

    Writers (``publish``, ``apply_retention``) of one model are serialised by ``flock`` on
    ``<model>/.lock``; readers need no lock, except ``mark_in_use`` which takes it briefly so a
    lease can never race a deletion. This object's leases expire ``lease_ttl_s`` after their
    last renewal (renewed by a daemon thread while held).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        stale_tmp_seconds: float = 3600.0,
        lease_ttl_s: float = DEFAULT_TTL_S,
    ) -> None:
        self.stale_tmp_seconds = stale_tmp_seconds
        super().__init__(root)
        self._leases = LeaseHolder(self, lease_ttl_s)

    # ---- writing

    def publish(
        self,
        model_name: str,
        onnx_path: str | os.PathLike,
        *,
        version: int | None = None,
        **options: Unpack[PublishOptions],
    ) -> int:
        """Publish an ONNX file as the next version of ``model_name``; return the version.

        ``version``: publish as exactly this number instead, which must be above every version
        the model ever had (versions only grow; RepositoryError otherwise). The options:
        :class:`serving.staging.PublishOptions`.
        """
        prepared = prepare_version(model_name, onnx_path, **options)
        name = prepared.name
        self._ensure_root()
        mdir = self.root / name
        if mdir.exists() and not mdir.is_dir():
            raise RepositoryError(
                f"{mdir} exists and is not a directory; remove it or pick another model name"
            )
        mdir.mkdir(exist_ok=True)
        with self._lock(name):
            config_path = mdir / CONFIG_FILE
            try:
                existing = config_path.read_text(encoding="utf-8")
            except FileNotFoundError:
                existing = None
            config_text = updated_config(existing, prepared, str(config_path))
            clean_tmp(mdir, self.stale_tmp_seconds)
            version = chosen_version(name, version, next_version(mdir))
            tmp = mdir / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                files = write_version(prepared, tmp, version)
                if config_text is not None:
                    atomic_write(config_path, config_text.encode(), tmp_prefix=TMP_PREFIX)
                _rename_into_place(tmp, mdir / str(version))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            fsync_dir(mdir)
            record_version(mdir, version)
        log.info("published %s version %d (%s)", name, version, ", ".join(sorted(files)))
        return version

    # ---- leases (see serving.leases)

    def mark_in_use(self, model: str, version: int) -> str:
        """Lease a version so retention keeps it; returns the lease id for :meth:`release`."""
        mdir = self.model_dir(model)
        version = validate_version(version)
        if not mdir.is_dir():
            raise RepositoryError(f"model {model!r} does not exist in {self.root}")
        with self._lock(model):
            if version not in self.list_versions(model):
                raise RepositoryError(f"version {version} of model {model!r} does not exist")
            return self._leases.acquire(model, version)

    def release(self, model: str, version: int, lease: str | None = None) -> None:
        """Drop one lease (``lease``) or every lease this object holds on ``version``."""
        self._leases.release(model, validate_version(version), lease)

    def release_all(self) -> None:
        """Drop every lease this object holds (a server calls it on shutdown)."""
        self._leases.release_all()

    @contextlib.contextmanager
    def in_use(self, model: str, version: int) -> Iterator[str]:
        """``with repo.in_use(model, v):`` leases ``v`` for the block."""
        lease = self.mark_in_use(model, version)
        try:
            yield lease
        finally:
            self.release(model, version, lease)

    def leased_versions(self, model: str) -> set[int]:
        """Versions with at least one live lease (of any holder)."""
        return live_versions(self, model)

    # the LeaseFiles of serving.leases: files in the root

    def write_lease(self, name: str, data: bytes) -> None:
        atomic_write(self.root / name, data, tmp_prefix=TMP_PREFIX)

    def remove_lease(self, name: str) -> None:
        (self.root / name).unlink()

    def lease_files(self) -> Iterable[tuple[str, bytes]]:
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if is_lease_file(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    yield entry.name, entry.read_bytes()

    # ---- retention

    def apply_retention(
        self,
        model: str,
        keep_last: int,
        keep_best_metric: str | None = None,
        *,
        mode: str = "max",
    ) -> list[int]:
        """Delete versions except the newest ``keep_last``, the best by ``keep_best_metric``
        (``mode`` max/min) and every leased one; return the deleted versions.

        Each deleted version is first renamed to a ``.tmp-*`` dir (so it vanishes atomically
        for readers), then removed. Dead and expired leases are deleted on the way.
        """
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise RepositoryError(f"keep_last must be an integer >= 1, got {keep_last!r}")
        mdir = self.model_dir(model)
        if not mdir.is_dir():
            return []
        removed: list[int] = []
        with self._lock(model):
            versions = self.list_versions(model)
            keep = set(versions[-keep_last:])
            if keep_best_metric is not None:
                best = self.best(model, keep_best_metric, mode)
                if best is not None:
                    keep.add(best)
            keep |= live_versions(self, model, drop_dead=True)
            for version in versions:
                if version in keep:
                    continue
                trash = mdir / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
                os.rename(mdir / str(version), trash)
                fsync_dir(mdir)
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(version)
        if removed:
            log.info("retention removed %s versions %s", model, removed)
        return removed

    # ---- internals

    def _ensure_root(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise RepositoryError(
                f"model repository path {str(self.root)!r} is a file, not a directory"
            )
        self.root.mkdir(parents=True, exist_ok=True)

    def _lock(self, model: str) -> contextlib.AbstractContextManager[None]:
        return exclusive_lock(self.model_dir(model) / LOCK_FILE)
