"""When to export a global version, and doing it without stopping training on a failure."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from server.config import ExperimentConfig
from server.export import check_parity, export_and_publish, export_onnx
from server.history import HistoryEntry
from serving.errors import StoreError
from serving.repository import ModelRepository
from serving.store import is_remote
from serving.store_repository import StoreRepository, open_repository
from task.config import ConfigError
from task.params import set_arrays

log = logging.getLogger(__name__)


@dataclass
class Publisher:
    """Exports global versions of ``model`` to ONNX into ``repository`` per ``cfg.export``.

    ``export_and_publish`` also applies retention (``export.keep_last``, and the best ``test_acc``
    when ``export.keep_best``). :meth:`publish` loads the version's arrays into ``model`` (the
    app's one torch model, shared with the central evaluation on the same thread).

    Latency (train->serve): export and parity check run with one torch thread (measured on the
    2-core machine under load, cnn on digits: export 0.061 -> 0.031 s, check 0.135 -> 0.023 s,
    medians), and :meth:`create` warms the exporter and onnxruntime up once on the initial model,
    so version 1 does not pay their first-call cost (~0.2-0.4 s).
    """

    repository: ModelRepository | StoreRepository
    sample: torch.Tensor  # a real test batch: the parity check runs on it
    model: torch.nn.Module
    cfg: ExperimentConfig

    @classmethod
    def create(
        cls, cfg: ExperimentConfig, sample: torch.Tensor, model: torch.nn.Module
    ) -> Publisher | None:
        """A warmed-up publisher, or None when ``export.enabled`` is off or no repository is set.

        A model store URL is checked first (listed and written: StoreError naming the URL and
        the failing call), so a run never trains into a store it cannot publish to."""
        if not cfg.export.enabled or not cfg.repository:
            return None
        publisher = cls(open_repository(cfg.repository), sample, model, cfg)
        publisher.warm_up()
        return publisher

    def warm_up(self) -> None:
        """Export and check the model once into a scratch file (nothing is published)."""
        started = time.perf_counter()
        try:
            with one_torch_thread(), tempfile.TemporaryDirectory(prefix="fedserve-warm-") as tmp:
                path = Path(tmp) / "model.onnx"
                info = export_onnx(self.model, self.sample, path, opset=self.cfg.export.opset)
                check_parity(self.model, info.path, self.sample, atol=self.cfg.export.atol)
        except Exception as exc:  # noqa: BLE001 - the real export reports failures
            log.debug("exporter warm-up failed: %s", exc)
            return
        log.info("exporter warmed up in %.2f s", time.perf_counter() - started)

    def due(self, version: int, is_best: bool) -> bool:
        """``export.every``-th version, the last one (``export.at_end``), or a new best
        (``export.on_best``)."""
        every = self.cfg.export.every
        return (
            (every > 0 and version % every == 0)
            or (self.cfg.export.at_end and version == self.cfg.rounds)
            or (self.cfg.export.on_best and is_best)
        )

    def publish(
        self, arrays: dict[str, np.ndarray], entry: HistoryEntry, version: int | None = None
    ) -> int | None:
        """Export ``arrays`` as repository ``version`` (default: the next) and add the export's
        timing to ``entry``; returns that version, or None after a failure (logged, never
        raised)."""
        started = time.perf_counter()
        cfg = self.cfg
        set_arrays(self.model, arrays)
        metadata = {
            "global_version": entry.version,
            "round": entry.round,
            "metrics": {"test_acc": entry.test_acc, "test_loss": entry.test_loss},
            "config": cfg.to_dict(),
            "timing": dict(entry.timing),
        }
        try:
            with one_torch_thread():
                result = export_and_publish(
                    self.model,
                    self.sample,
                    self.repository,
                    cfg.export.model_name,
                    metadata,
                    cfg.export,
                    version=version,
                )
        except Exception:  # noqa: BLE001 - an export failure must never stop training
            log.exception("export of global version %d failed; training goes on", entry.version)
            return None
        log.info(
            "published global version %d as %s/%d (max abs diff %.2e, %.2f s: %s)",
            entry.version,
            cfg.export.model_name,
            result.version,
            result.max_abs_diff,
            time.perf_counter() - started,
            ", ".join(f"{k} {v:.2f}" for k, v in result.seconds.items()),
        )
        entry.timing.update({f"{k}_s": v for k, v in result.seconds.items() if k != "total"})
        entry.timing["published_at"] = time.time()
        return result.version


def check_repository(location: str | None) -> None:
    """Refuse, before anything starts, a model store that cannot be listed and written:
    ConfigError of one line naming ``repository=<url>``, the failing call and the error."""
    if location and is_remote(location):
        try:
            open_repository(location)
        except StoreError as exc:
            raise ConfigError(f"repository={location}: {exc}") from None


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(1)``, restoring the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
