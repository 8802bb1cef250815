"""When to export a global version, and doing it without stopping training on a failure."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from server.export import export_and_publish
from server.history import HistoryEntry
from serving.repository import ModelRepository
from task.config import ExperimentConfig
from task.params import set_arrays

log = logging.getLogger(__name__)


@dataclass
class Publisher:
    """Exports global versions to ONNX into ``repository`` per ``export.*`` of the config.

    ``export_and_publish`` also applies retention (``export.keep_last``, and the best ``test_acc``
    when ``export.keep_best``).
    """

    repository: ModelRepository
    sample: torch.Tensor  # a real test batch: the parity check runs on it

    @classmethod
    def create(cls, cfg: ExperimentConfig, sample: torch.Tensor) -> Publisher | None:
        if not cfg.export.enabled or not cfg.repository:
            return None
        return cls(ModelRepository(Path(cfg.repository)), sample)

    @staticmethod
    def due(cfg: ExperimentConfig, version: int, is_best: bool) -> bool:
        every = cfg.export.every
        return (
            (every > 0 and version % every == 0)
            or (cfg.export.at_end and version == cfg.rounds)
            or (cfg.export.on_best and is_best)
        )

    def publish(
        self,
        model: torch.nn.Module,
        arrays: dict[str, np.ndarray],
        entry: HistoryEntry,
        cfg: ExperimentConfig,
    ) -> int | None:
        """Export ``arrays`` as the next repository version; a failure is logged, not raised."""
        started = time.perf_counter()
        set_arrays(model, arrays)
        metadata = {
            "global_version": entry.version,
            "round": entry.round,
            "metrics": {"test_acc": entry.test_acc, "test_loss": entry.test_loss},
            "config": cfg.to_dict(),
        }
        try:
            result = export_and_publish(
                model, self.sample, self.repository, cfg.export.model_name, metadata, cfg.export
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
        return result.version
