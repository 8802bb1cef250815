"""The serving side of a model store: a local cache that follows the store's repository.

``fedserve-serve repository=s3://bucket/prefix`` serves the local repository
:attr:`StoreMirror.cache` (a :class:`~serving.repository.ModelRepository` in
``serving.store.cache_dir``), which a background thread keeps in step with the store, so the
repository watcher sees the same methods as for a local repository. Every ``serving.store.poll_s``
the thread

1. lists the store (one LIST; listings are never cached) and reads it as models and committed
   versions (:mod:`serving.store_layout`: versions without a manifest do not exist);
2. copies a changed ``config.pbtxt``;
3. downloads each wanted version that is not cached yet (the newest ones by the config's version
   policy, or ``serving.versions``) into a ``.tmp-*`` directory, checks every file's size and
   sha256 against the manifest, and renames it into place: the watcher then finds it as it
   finds a local publish (a version failing its checksums, or missing a file, is logged and
   skipped until its manifest changes; one whose manifest is gone by the time it is read is
   not committed any more: skipped, not a store failure);
4. drops versions the store no longer has, and evicts the least recently used versions while the
   cache holds more than ``serving.store.cache_max_bytes`` (never a leased one: what is served);
5. mirrors the cache's leases into the store (:mod:`serving.leases`), so the trainer's retention
   keeps what this server serves.

When the store does not answer (or the local cache fails: a full disk), nothing cached changes
(what serves keeps serving) and the thread retries with exponential backoff up to
``serving.store.retry_max_s``, one log line per attempt;
:attr:`StoreMirror.problem` says what failed until a sync succeeds again, and ``synced_at`` stays
None until the first one did (the server is not ready before).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

from serving.config_schema import ConfigError
from serving.errors import RepositoryError, StoreError, StoreKeyMissing
from serving.fsutil import atomic_write, fsync_dir, remove_path, sha256_file
from serving.layout import CONFIG_FILE, TMP_PREFIX, VERSION_RE
from serving.leases import LeaseHolder
from serving.model_config import version_policy
from serving.repository import ModelRepository
from serving.store import Store, StoreConfig, is_remote
from serving.store_layout import (
    MANIFEST_FILE,
    RemoteListing,
    RemoteModel,
    parse_listing,
    read_manifest,
)
from serving.store_repository import StoreRepository

log = logging.getLogger(__name__)

CACHE_LOCK = ".fedserve-cache.lock"


def default_cache_dir(url: str) -> Path:
    """``$XDG_CACHE_HOME/fedserve/<sha256(url)[:16]>`` (``~/.cache`` by default)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fedserve" / hashlib.sha256(url.encode()).hexdigest()[:16]


class StoreMirror:
    """Keeps :attr:`cache` in step with the repository at ``store`` (see the module docstring).

    ``versions`` overrides the config's version policy as the watcher's ``serving.versions``
    does; ``models`` limits the mirror to those models. The cache directory is this process's
    alone (an exclusive lock; a second server on it is refused with the fix).
    """

    def __init__(
        self,
        store: Store,
        settings: StoreConfig | None = None,
        *,
        versions: int | None = None,
        models: set[str] | None = None,
    ) -> None:
        self.store = store
        self.remote = StoreRepository(store)
        self.settings = settings or StoreConfig()
        root = Path(self.settings.cache_dir or default_cache_dir(store.url)).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_cache(root, store.url)
        self.cache = ModelRepository(root)
        self.versions = versions
        self.models = models
        #: ``time.monotonic()`` when the first successful sync finished (None before)
        self.synced_at: float | None = None
        self.problem: str | None = None
        self._failures = 0
        self._listing = RemoteListing()
        self._config_stamps: dict[str, str] = {}
        self._rejected: dict[tuple[str, int], str] = {}  # -> manifest stamp it failed with
        self._used: dict[tuple[str, int], float] = {}  # last time wanted or leased
        self._wanted: set[tuple[str, int]] = set()
        self._leases = LeaseHolder(self.remote)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle

    def start(self) -> None:
        """Sync once now (so the first poll of the watcher sees the store's versions), then
        keep syncing in a background thread."""
        self.sync()
        self._thread = threading.Thread(target=self._run, name="store-mirror", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop syncing and remove this server's leases from the store (best effort)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
        try:
            self._leases.release_all()
        except StoreError as exc:
            log.warning("cannot remove this server's leases from the store: %s", exc)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    def _run(self) -> None:
        while not self._stop.wait(self.next_wait()):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - the mirror must outlive a bad pass (a bug)
                self._failures += 1
                log.exception("store sync failed; retrying in %.1f s", self.next_wait())

    def next_wait(self) -> float:
        """``poll_s``, or the backoff after consecutive failures (doubling, capped)."""
        if not self._failures:
            return self.settings.poll_s
        return min(
            self.settings.retry_max_s, max(self.settings.poll_s, 1.0) * 2 ** (self._failures - 1)
        )

    # ---- one sync

    def sync(self) -> bool:
        """One pass (see the module docstring); False when the store failed (logged)."""
        try:
            listing = parse_listing(self.store.listing())
            self._wanted = set()
            for name, model in sorted(listing.models.items()):
                if self.models is None or name in self.models:
                    self._sync_model(name, model)
            self._listing = listing
            self._drop_removed(listing)
            self._evict()
            self._sync_leases()
        except StoreError as exc:
            self._failures += 1
            self.problem = str(exc)
            log.warning("%s; retrying in %.1f s", exc, self.next_wait())
            return False
        except OSError as exc:  # the local cache: disk full, permissions
            self._failures += 1
            self.problem = f"the cache directory {self.cache.root} failed: {exc}"
            log.warning("%s; retrying in %.1f s", self.problem, self.next_wait())
            return False
        if self._failures:
            log.info("model store %s answers again", self.store.url)
        self._failures = 0
        self.problem = None
        if self.synced_at is None:
            self.synced_at = time.monotonic()
        return True

    def _sync_model(self, name: str, model: RemoteModel) -> None:
        mdir = self.cache.root / name
        mdir.mkdir(exist_ok=True)
        if model.config is not None and self._config_stamps.get(name) != model.config.stamp:
            data = self.store.read(f"{name}/{CONFIG_FILE}")
            atomic_write(mdir / CONFIG_FILE, data, tmp_prefix=TMP_PREFIX)
            self._config_stamps[name] = model.config.stamp
        elif model.config is None and (mdir / CONFIG_FILE).exists():
            (mdir / CONFIG_FILE).unlink()
            self._config_stamps.pop(name, None)
        cached = set(self.cache.list_versions(name))
        wanted = 0
        for version in self._candidates(name, sorted(model.versions, reverse=True)):
            if wanted >= self._count(name, len(model.versions)):
                break
            stamp = model.manifest(version).stamp
            if self._rejected.get((name, version)) == stamp:
                continue
            try:
                present = version in cached or self._download(name, version)
            except StoreKeyMissing as exc:
                # deletion removes the manifest first: the version went after the listing
                log.info("%s version %d is no longer committed: %s", name, version, exc)
                continue
            if present:
                wanted += 1
                self._wanted.add((name, version))
                self._used.setdefault((name, version), time.time())
            else:
                self._rejected[(name, version)] = stamp

    def _candidates(self, name: str, newest_first: list[int]) -> list[int]:
        if self.versions is not None:
            return newest_first
        policy = self._policy(name)
        if "specific" in policy:
            chosen = set(policy["specific"].get("versions", []))
            return [v for v in newest_first if v in chosen]
        return newest_first

    def _count(self, name: str, available: int) -> int:
        if self.versions is not None:
            return self.versions
        policy = self._policy(name)
        if "all" in policy or "specific" in policy:
            return available
        return max(1, int((policy.get("latest") or {}).get("num_versions", 1)))

    def _policy(self, name: str) -> dict:
        try:
            return version_policy(self.cache.read_config(name))
        except RepositoryError as exc:
            log.warning("model %s: %s; mirroring the newest version", name, exc)
            return {}

    def _download(self, name: str, version: int) -> bool:
        """Fetch a committed version into the cache; False (logged) when its files do not match
        its manifest (a file it names missing included). StoreKeyMissing when the manifest is
        gone (the version is not committed any more); StoreError propagates: the store failed,
        not the version."""
        where = self.store.path(f"{name}/{version}/{MANIFEST_FILE}")
        started = time.perf_counter()
        mdir = self.cache.root / name
        tmp = mdir / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            files = read_manifest(
                self.store.read(f"{name}/{version}/{MANIFEST_FILE}"), where, version
            )
            for file, (size, digest) in files.items():
                path = tmp / file
                try:
                    self.store.download(f"{name}/{version}/{file}", path)
                except StoreKeyMissing as exc:
                    raise RepositoryError(f"a file its manifest names is missing: {exc}") from None
                actual_size, actual = path.stat().st_size, sha256_file(path)
                if (actual_size, actual) != (size, digest):
                    raise RepositoryError(
                        f"{self.store.path(f'{name}/{version}/{file}')}: expected {size} bytes "
                        f"with sha256 {digest}, downloaded {actual_size} bytes with {actual}"
                    )
            for path in tmp.iterdir():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(tmp)
            os.rename(tmp, mdir / str(version))
            fsync_dir(mdir)
        except RepositoryError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            log.error("skipping %s version %d from the store: %s", name, version, exc)
            return False
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info(
            "downloaded %s version %d from %s in %.2f s",
            name,
            version,
            self.store.url,
            time.perf_counter() - started,
        )
        return True

    def _drop_removed(self, listing: RemoteListing) -> None:
        """Cached versions (and models) the store no longer has go, unless leased."""
        for mdir in [p for p in self.cache.root.iterdir() if p.is_dir()]:
            if mdir.name.startswith("."):
                continue
            remote = listing.models.get(mdir.name)
            leased = self.cache.leased_versions(mdir.name)
            for entry in mdir.iterdir():
                if not VERSION_RE.match(entry.name):
                    continue
                version = int(entry.name)
                if (remote is None or version not in remote.versions) and version not in leased:
                    self._remove(mdir.name, version)
            if remote is None and not self.cache.list_versions(mdir.name) and not leased:
                remove_path(mdir)
                self._config_stamps.pop(mdir.name, None)

    def _evict(self) -> None:
        """Least recently used first (last leased, else downloaded), while over budget;
        leased versions and those the policy wants now stay."""
        sizes = {
            (m, v): _dir_bytes(self.cache.version_dir(m, v))
            for m in self.cache.list_models()
            for v in self.cache.list_versions(m)
        }
        leased = {(m, v) for m in {m for m, _ in sizes} for v in self.cache.leased_versions(m)}
        now = time.time()
        for key in leased:
            self._used[key] = now
        total = sum(sizes.values())
        budget = self.settings.cache_max_bytes
        for key in sorted(set(sizes) - leased - self._wanted, key=lambda k: self._used.get(k, 0)):
            if total <= budget:
                break
            log.info("cache over %d bytes: evicting %s version %d", budget, *key)
            self._remove(*key)
            total -= sizes[key]
        if total > budget:
            log.warning(
                "the cache holds %d bytes of served versions, over serving.store.cache_max_bytes"
                "=%d",
                total,
                budget,
            )

    def _remove(self, model: str, version: int) -> None:
        mdir = self.cache.root / model
        trash = mdir / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(mdir / str(version), trash)
            remove_path(trash)
        self._used.pop((model, version), None)

    def _sync_leases(self) -> None:
        held = {(m, v) for m in self.cache.list_models() for v in self.cache.leased_versions(m)}
        if held != self._leases.held():
            self._leases.hold_exactly(held)


def open_served_repository(
    location: str, settings: StoreConfig, *, versions: int | None, models: list[str] | None
) -> tuple[ModelRepository, StoreMirror | None]:
    """What ``fedserve-serve repository=<location>`` serves: the local repository at a path, or
    the started mirror of a store URL and its cache. ConfigError (one line) for a path that is
    not a directory or a URL no store library takes; a store that does not answer is not an
    error here: the mirror retries it (see :class:`StoreMirror`)."""
    if not is_remote(location):
        root = Path(location.removeprefix("file://")).expanduser()
        if not root.is_dir():
            raise ConfigError(
                f"repository={root} is not a directory; pass repository=<path to a model "
                "repository> or a model store URL (s3://bucket/prefix)"
            )
        return ModelRepository(root), None
    try:
        mirror = StoreMirror(
            Store(location), settings, versions=versions, models=set(models) if models else None
        )
    except (StoreError, RepositoryError) as exc:
        raise ConfigError(f"repository={location}: {exc}") from None
    mirror.start()
    return mirror.cache, mirror


def _lock_cache(root: Path, url: str) -> int:
    fd = os.open(root / CACHE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RepositoryError(
            f"the cache directory {root} of {url} is in use by another fedserve-serve; give "
            "this one its own: serving.store.cache_dir=<dir>"
        ) from None
    return fd


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
