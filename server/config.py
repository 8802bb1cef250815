"""The experiment's typed configuration: the task, the run, the strategy and the export.

:class:`ExperimentConfig` is the schema of ``conf/config.yaml`` (a Hydra structured config; its
sections are the schemas of conf/'s groups, each defined by the part that owns it: the task in
:mod:`task.config`, the strategy in :mod:`server.strategy.config`, the export in
:mod:`server.export`). Composing conf/ against it rejects unknown keys and values of the wrong
type (``rounds=abc``, ``rounds=2.5``); :meth:`ExperimentConfig.validate` then checks ranges and
combinations. The same config gives the same run, under ``fedserve-train`` or ``flwr run .``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.export import ExportConfig
from server.strategy.config import StrategyConfig
from task.config import ConfigError, TaskConfig, check_positive


@dataclass
class ExperimentConfig(TaskConfig):
    """One federated run: the task's sections plus the run's knobs, strategy and export."""

    rounds: int = 5
    num_clients: int = 10
    output_dir: str | None = None
    repository: str | None = "model_repository"
    resume: bool = False
    # keys (or sections) a resumed run may deliberately change (server/resume.py)
    resume_allow_changes: list[str] = field(default_factory=list)
    stop_at_accuracy: float | None = None  # stop after the first version reaching this test acc
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def validate(self) -> None:
        check_positive("rounds", self.rounds)
        check_positive("num_clients", self.num_clients)
        if self.stop_at_accuracy is not None and not 0 < self.stop_at_accuracy <= 1:
            raise ConfigError(
                f"stop_at_accuracy must be in (0, 1] or null, got {self.stop_at_accuracy}"
            )
        super().validate()
        self.strategy.validate()
        self.export.validate()
