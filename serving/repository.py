"""A versioned ONNX model repository in NVIDIA Triton's layout.

Layout (Triton loads it unchanged; the dot-names are ignored by Triton)::

    <root>/<model>/config.pbtxt                 Triton ModelConfig (protobuf text format)
    <root>/<model>/<version>/model.onnx         version = 1, 2, 3, ... (never reused)
    <root>/<model>/<version>/model.onnx.data    only for models saved with ONNX external data
    <root>/<model>/<version>/metadata.json      ours: version, round, metrics, sha256 of files, ...
    <root>/<model>/.fedserve_state.json         highest version ever published
    <root>/<model>/.in_use/<version>.<pid>.<id> a reader's lease on a version
    <root>/<model>/.lock                        flock(2) serialising writers of this model
    <root>/<model>/.tmp-<pid>-<id>              a version being written, or being deleted

Guarantees:

* **Atomic publish.** A version is written completely into a ``.tmp-*`` directory inside the
  model directory, every file and the directory are fsync'ed, and it appears by one
  ``rename(2)`` to ``<version>`` (then the parent is fsync'ed). A reader never sees half of a
  version. A crash before the rename leaves only the ``.tmp-*`` directory; the next publish (which
  holds the model's lock, so no live writer can own it) deletes it.
* **Versions only grow.** The next version is ``max(existing, highest ever recorded) + 1``;
  retention deleting the newest-ever version does not let its number be reused.
* **Leases.** :meth:`ModelRepository.mark_in_use` records a lease file; retention never deletes a
  version with a live lease. Leases of dead processes (same host) are ignored and cleaned.
* **Failures change nothing already published.** Bad names, bad files, a checksum mismatch or a
  crash mid-publish leave existing versions and their files intact.

This module holds the writers (publish, leases, retention); the read side is
:mod:`serving.repository_reader`, the specs :mod:`serving.tensor_spec` and
:mod:`serving.onnx_specs`, the names :mod:`serving.layout`, durable file primitives
:mod:`serving.fsutil`, leases :mod:`serving.leases` and the version counter
:mod:`serving.version_state`.
Needs only the standard library, numpy and onnx (no torch, no flwr).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnx

from serving.errors import RepositoryError
from serving.fsutil import (
    atomic_write,
    copy_hash_fsync,
    exclusive_lock,
    fsync_dir,
    sha256_file,
    write_fsync,
)
from serving.layout import (
    CONFIG_FILE,
    DATA_FILE,
    LEASE_DIR,
    LOCK_FILE,
    METADATA_FILE,
    MODEL_FILE,
    TMP_PREFIX,
    jsonable,
    validate_model_name,
    validate_version,
)
from serving.leases import create_lease, live_leases, remove_leases
from serving.model_config import render_config
from serving.onnx_external import external_locations, relocate_external
from serving.onnx_specs import check_specs, specs_from_onnx
from serving.repository_reader import RepositoryReader
from serving.tensor_spec import TensorSpec
from serving.version_state import clean_tmp, next_version, record_version

log = logging.getLogger(__name__)


def _rename_into_place(src: Path, dst: Path) -> None:
    """The commit point of a publish (a separate function so a crash test can stop here)."""
    os.rename(src, dst)


class ModelRepository(RepositoryReader):
    """A Triton-layout model repository rooted at ``root`` (created on first publish).

    Writers (``publish``, ``apply_retention``) of one model are serialised by ``flock`` on
    ``<model>/.lock``; readers need no lock, except ``mark_in_use`` which takes it briefly so a
    lease can never race a deletion.
    """

    def __init__(self, root: str | os.PathLike, *, stale_tmp_seconds: float = 3600.0) -> None:
        self.stale_tmp_seconds = stale_tmp_seconds
        super().__init__(root)

    # ---- writing

    def publish(
        self,
        model_name: str,
        onnx_path: str | os.PathLike,
        *,
        inputs: Sequence[TensorSpec] | None = None,
        outputs: Sequence[TensorSpec] | None = None,
        metadata: dict[str, Any] | None = None,
        max_batch_size: int,
        external_data: str | os.PathLike | None = None,
        num_versions: int | None = 1,
        instance_count: int = 1,
        max_queue_delay_microseconds: int = 100,
    ) -> int:
        """Publish an ONNX file as the next version of ``model_name``; return the version.

        ``inputs``/``outputs`` default to the graph's own; given, they must agree with it.
        ``external_data`` is the file the graph's external tensors refer to; it is stored as
        ``model.onnx.data`` (the graph's references are rewritten if named otherwise).
        ``metadata`` supplies ``global_version``, ``round``, ``metrics``, ``config`` and any
        extra keys; ``version``, ``files``, ``inputs``, ``outputs``, ``opset``,
        ``max_batch_size`` and ``created`` are filled in here. ``config.pbtxt`` is (re)written
        with ``num_versions`` (None = all versions) for Triton's version policy.
        """
        name = validate_model_name(model_name)
        src = Path(onnx_path)
        if not src.is_file():
            raise RepositoryError(f"ONNX file to publish not found: {src}")
        data_src = Path(external_data) if external_data is not None else None
        if data_src is not None and not data_src.is_file():
            raise RepositoryError(f"external data file to publish not found: {data_src}")
        try:
            proto = onnx.load(str(src), load_external_data=False)
        except Exception as exc:
            raise RepositoryError(f"{src} is not a readable ONNX model: {exc}") from None
        graph_inputs, graph_outputs = specs_from_onnx(proto)
        inputs = list(graph_inputs if inputs is None else inputs)
        outputs = list(graph_outputs if outputs is None else outputs)
        check_specs("input", inputs, graph_inputs)
        check_specs("output", outputs, graph_outputs)
        locations = external_locations(proto)
        if locations and data_src is None:
            raise RepositoryError(
                f"{src} keeps tensors in external data {sorted(locations)}; pass external_data="
            )
        if data_src is not None and not locations:
            raise RepositoryError(
                f"external_data={str(data_src)!r} given, but {src} has no external tensors"
            )
        if len(locations) > 1:
            raise RepositoryError(
                f"{src} spreads external data over {sorted(locations)}; save all tensors to one "
                "file (onnx.save_model(..., all_tensors_to_one_file=True))"
            )
        try:
            config_text = render_config(
                name,
                inputs,
                outputs,
                max_batch_size=max_batch_size,
                num_versions=num_versions,
                instance_count=instance_count,
                max_queue_delay_microseconds=max_queue_delay_microseconds,
            )
        except ValueError as exc:
            raise RepositoryError(f"cannot write config.pbtxt for {name!r}: {exc}") from None
        meta = jsonable(dict(metadata or {}))
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)

        self._ensure_root()
        mdir = self.root / name
        if mdir.exists() and not mdir.is_dir():
            raise RepositoryError(
                f"{mdir} exists and is not a directory; remove it or pick another model name"
            )
        mdir.mkdir(exist_ok=True)
        with self._lock(name):
            clean_tmp(mdir, self.stale_tmp_seconds)
            version = next_version(mdir)
            tmp = mdir / f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
            tmp.mkdir()
            try:
                files: dict[str, str] = {}
                if locations and locations != {DATA_FILE}:
                    relocate_external(proto, DATA_FILE)
                    write_fsync(tmp / MODEL_FILE, proto.SerializeToString())
                    files[MODEL_FILE] = sha256_file(tmp / MODEL_FILE)
                else:
                    files[MODEL_FILE] = copy_hash_fsync(src, tmp / MODEL_FILE)
                if data_src is not None:
                    files[DATA_FILE] = copy_hash_fsync(data_src, tmp / DATA_FILE)
                meta.setdefault("global_version", None)
                meta.setdefault("round", None)
                meta.setdefault("metrics", {})
                meta.setdefault("config", {})
                meta.update(
                    version=version,
                    files=files,
                    inputs=[s.to_dict() for s in inputs],
                    outputs=[s.to_dict() for s in outputs],
                    opset=opset,
                    max_batch_size=int(max_batch_size),
                    created=datetime.now(UTC).isoformat(timespec="milliseconds"),
                )
                payload = json.dumps(meta, indent=2, sort_keys=True, allow_nan=False).encode()
                write_fsync(tmp / METADATA_FILE, payload + b"\n")
                fsync_dir(tmp)
                atomic_write(mdir / CONFIG_FILE, config_text.encode(), tmp_prefix=TMP_PREFIX)
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
            return create_lease(mdir / LEASE_DIR, version)

    def release(self, model: str, version: int, lease: str | None = None) -> None:
        """Drop one lease (``lease``) or every lease this process holds on ``version``."""
        version = validate_version(version)
        remove_leases(self.model_dir(model) / LEASE_DIR, version, lease)

    @contextlib.contextmanager
    def in_use(self, model: str, version: int) -> Iterator[str]:
        """``with repo.in_use(model, v):`` leases ``v`` for the block."""
        lease = self.mark_in_use(model, version)
        try:
            yield lease
        finally:
            self.release(model, version, lease)

    def leased_versions(self, model: str) -> set[int]:
        """Versions with at least one live lease."""
        return {v for v, _ in live_leases(self.model_dir(model) / LEASE_DIR, drop_dead=False)}

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
        for readers), then removed.
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
            keep |= {v for v, _ in live_leases(mdir / LEASE_DIR, drop_dead=True)}
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
