"""The writer of a model repository on a model store: publish, retention, leases.

Publishing keeps the local repository's guarantee without an atomic rename
(:mod:`serving.store_layout`): the version's files are written and checked locally
(:mod:`serving.staging`), uploaded under ``<model>/.tmp-<pid>-<id>/``, moved to
``<model>/<version>/``, then ``config.pbtxt`` is updated and the manifest written: that last
small write makes the version visible. Retention deletes a version's manifest first, so it
vanishes for readers at once, and sweeps uploads and uncommitted versions a crash left behind.

One writer per model: a store has no lock, so two trainers publishing the same model into one
store could pick the same version number (the second manifest would win). Readers' leases are
the local repository's (:mod:`serving.leases`), as objects in the store's root.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Unpack

from tritonclient.grpc.model_config_pb2 import ModelConfig

from serving.errors import RepositoryError, StoreError
from serving.fsutil import sha256_file
from serving.layout import (
    CONFIG_FILE,
    DATA_FILE,
    METADATA_FILE,
    MODEL_FILE,
    STATE_FILE,
    TMP_PREFIX,
    best_version,
    validate_model_name,
    validate_version,
)
from serving.leases import live_versions
from serving.model_config import parse_config
from serving.repository import ModelRepository
from serving.staging import PublishOptions, prepare_version, updated_config, write_version
from serving.store import Store, is_remote
from serving.store_layout import MANIFEST_FILE, RemoteModel, manifest_bytes, parse_listing
from serving.version_state import chosen_version

log = logging.getLogger(__name__)

#: files of a version in the order they are moved into place (model.onnx after its data)
UPLOAD_ORDER = (DATA_FILE, METADATA_FILE, MODEL_FILE)


class StoreRepository:
    """A Triton-layout model repository at a store URL (see the module docstring)."""

    def __init__(self, store: Store, *, stale_tmp_seconds: float = 3600.0) -> None:
        self.store = store
        self.stale_tmp_seconds = stale_tmp_seconds

    @property
    def url(self) -> str:
        return self.store.url

    def __repr__(self) -> str:
        return f"StoreRepository({self.url!r})"

    def check(self) -> None:
        """Refuse a store that cannot be listed or written (StoreError naming the call)."""
        self.store.check()

    # ---- reading

    def _model(self, model: str) -> RemoteModel:
        name = validate_model_name(model)
        return parse_listing(self.store.listing(name)).models.get(name, RemoteModel())

    def list_models(self) -> list[str]:
        return sorted(parse_listing(self.store.listing()).models)

    def list_versions(self, model: str) -> list[int]:
        """Committed versions (those with a manifest), ascending."""
        return sorted(self._model(model).versions)

    def load_metadata(self, model: str, version: int) -> dict[str, Any]:
        key = f"{validate_model_name(model)}/{validate_version(version)}/{METADATA_FILE}"
        try:
            data = json.loads(self.store.read(key))
        except ValueError as exc:
            raise RepositoryError(f"{self.store.path(key)} is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise RepositoryError(f"{self.store.path(key)} must hold a JSON object")
        return data

    def read_config(self, model: str) -> ModelConfig:
        key = f"{validate_model_name(model)}/{CONFIG_FILE}"
        if self._model(model).config is None:
            return ModelConfig()
        return parse_config(self.store.read(key).decode("utf-8"), self.store.path(key))

    def best(self, model: str, metric: str, mode: str = "max") -> int | None:
        """As :meth:`RepositoryReader.best`: the best committed version by a metric."""
        return self._best(model, self.list_versions(model), metric, mode)

    def _best(self, model: str, versions: list[int], metric: str, mode: str) -> int | None:
        return best_version(((v, self._metric(model, v, metric)) for v in versions), mode)

    def _metric(self, model: str, version: int, metric: str) -> Any:
        try:
            return (self.load_metadata(model, version).get("metrics") or {}).get(metric)
        except (RepositoryError, StoreError) as exc:
            log.warning("skipping version %s of %s in best(): %s", version, model, exc)
            return None

    # ---- publishing

    def publish(
        self,
        model_name: str,
        onnx_path: str | os.PathLike,
        *,
        version: int | None = None,
        **options: Unpack[PublishOptions],
    ) -> int:
        """As :meth:`serving.repository.ModelRepository.publish`, onto the store."""
        prepared = prepare_version(model_name, onnx_path, **options)
        name = prepared.name
        remote = self._model(name)
        config_key = f"{name}/{CONFIG_FILE}"
        existing = self.store.read(config_key).decode("utf-8") if remote.config else None
        config_text = updated_config(existing, prepared, self.store.path(config_key))
        self._sweep(name, remote)
        version = chosen_version(name, version, self._next_version(name, remote))
        staging = f"{name}/{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        with tempfile.TemporaryDirectory(prefix="fedserve-publish-") as tmp:
            local = Path(tmp)
            files = write_version(prepared, local, version)
            names = [f for f in UPLOAD_ORDER if (local / f).is_file()]
            try:
                for file in names:
                    self.store.upload(local / file, f"{staging}/{file}")
                for file in names:
                    self.store.move(f"{staging}/{file}", f"{name}/{version}/{file}")
                if config_text is not None:
                    self.store.write(config_key, config_text.encode())
                sizes = {
                    f: ((local / f).stat().st_size, files.get(f) or sha256_file(local / f))
                    for f in names
                }
                created = datetime.now(UTC).isoformat(timespec="milliseconds")
                self.store.write(
                    f"{name}/{version}/{MANIFEST_FILE}", manifest_bytes(version, sizes, created)
                )
            except BaseException:
                with contextlib.suppress(StoreError):
                    self.store.remove(
                        [f"{staging}/{f}" for f in names] + [f"{name}/{version}/{f}" for f in names]
                    )
                raise
        self._record_version(name, version)
        log.info("published %s version %d to %s (%s)", name, version, self.url, ", ".join(names))
        return version

    def _next_version(self, name: str, remote: RemoteModel) -> int:
        recorded = 0
        if remote.state is not None:
            with contextlib.suppress(ValueError, StoreError):
                value = json.loads(self.store.read(f"{name}/{STATE_FILE}")).get("max_version")
                recorded = value if isinstance(value, int) else 0
        return max([0, recorded, *remote.versions, *remote.uncommitted]) + 1

    def _record_version(self, name: str, version: int) -> None:
        self.store.write(f"{name}/{STATE_FILE}", json.dumps({"max_version": version}).encode())

    def _sweep(self, name: str, remote: RemoteModel) -> None:
        """Delete uploads and uncommitted versions a crash left, once older than
        ``stale_tmp_seconds`` (younger ones may belong to a live upload)."""
        now = time.time()
        leftovers = [
            *((f"{name}/{prefix}", files) for prefix, files in remote.staging.items()),
            *((f"{name}/{v}", files) for v, files in remote.uncommitted.items()),
        ]
        for prefix, files in leftovers:
            ages = [now - e.mtime for e in files.values() if e.mtime is not None]
            if ages and min(ages) > self.stale_tmp_seconds:
                log.info("removing the leftover upload %s", self.store.path(prefix))
                self.store.remove([f"{prefix}/{f}" for f in files])

    # ---- leases (serving.leases' LeaseFiles: objects in the root)

    def leased_versions(self, model: str) -> set[int]:
        return live_versions(self, model)

    def write_lease(self, name: str, data: bytes) -> None:
        self.store.write(name, data)

    def remove_lease(self, name: str) -> None:
        self.store.remove([name])

    def lease_files(self) -> Iterable[tuple[str, bytes]]:
        for key in parse_listing(self.store.listing(maxdepth=1)).leases:
            with contextlib.suppress(StoreError):
                yield key, self.store.read(key)

    # ---- retention

    def apply_retention(
        self,
        model: str,
        keep_last: int,
        keep_best_metric: str | None = None,
        *,
        mode: str = "max",
    ) -> list[int]:
        """As :meth:`ModelRepository.apply_retention`: each deleted version's manifest goes
        first (it vanishes for readers), then its files."""
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise RepositoryError(f"keep_last must be an integer >= 1, got {keep_last!r}")
        name = validate_model_name(model)
        remote = self._model(name)
        versions = sorted(remote.versions)
        keep = set(versions[-keep_last:])
        if keep_best_metric is not None:
            best = self._best(name, versions, keep_best_metric, mode)
            if best is not None:
                keep.add(best)
        keep |= live_versions(self, name, drop_dead=True)
        removed = []
        for version in versions:
            if version in keep:
                continue
            self.store.remove([f"{name}/{version}/{MANIFEST_FILE}"])
            files = [f for f in remote.versions[version] if f != MANIFEST_FILE]
            self.store.remove([f"{name}/{version}/{f}" for f in files])
            removed.append(version)
        if removed:
            log.info("retention removed %s versions %s from %s", name, removed, self.url)
        return removed


def open_repository(location: str | os.PathLike) -> ModelRepository | StoreRepository:
    """The writer for ``location``: a local path, or a store URL (checked: listed and written,
    StoreError naming the URL and the failing call)."""
    if isinstance(location, str) and is_remote(location):
        repository = StoreRepository(Store(location))
        repository.check()
        return repository
    path = str(location)
    return ModelRepository(Path(path.removeprefix("file://")).expanduser())
