"""Compose conf/ against the typed schema into an :class:`ExperimentConfig` (Hydra).

:func:`register_schemas` puts :class:`~server.job_config.TrainJobConfig` (the experiment plus the
launcher's ``simulation`` section) into Hydra's ConfigStore as ``experiment_schema``;
``conf/config.yaml`` lists it first in its defaults, so every group option and every override is
merged into typed nodes (:mod:`serving.config_schema` has the strict rules and the one-line errors
both command-line apps share). It also registers the resolver the Optuna search configs use for
their direction (:func:`server.sweep.objective_direction`).

``flwr run .`` carries Hydra overrides in the run-config key ``overrides``
(``--run-config 'overrides="strategy=fedadam partition=dirichlet partition.alpha=0.3"'``); the
ServerApp composes conf/ with them here (:func:`compose_experiment`), exactly as ``fedserve-train``
does with its command line.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import TypeVar

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from server.config import ExperimentConfig
from server.job_config import TrainJobConfig
from server.sweep import DIRECTION_RESOLVER, objective_direction
from serving import config_schema
from task.config import ConfigError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SCHEMA_NAME = "experiment_schema"
T = TypeVar("T", ExperimentConfig, TrainJobConfig)


def register_schemas() -> None:
    """Store the schema conf/config.yaml's defaults list names, and the resolvers it uses
    (idempotent)."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainJobConfig)
    if not OmegaConf.has_resolver(DIRECTION_RESOLVER):
        OmegaConf.register_new_resolver(DIRECTION_RESOLVER, objective_direction)


def parse_overrides(text: str) -> list[str]:
    """A JSON list of overrides, or a shell-style space-separated string of them."""
    text = text.strip()
    if not text:
        return []
    if text.startswith("["):
        overrides = json.loads(text)
        if not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"overrides must be a JSON list of strings, got {text!r}")
        return overrides
    return shlex.split(text)


def compose_experiment(overrides: list[str]) -> ExperimentConfig:
    """Compose ``conf/config.yaml`` with ``overrides`` and validate it (ConfigError, one line)."""
    check_overrides(overrides)
    register_schemas()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(config_schema.describe_error(err)) from err
    return experiment_from_hydra(cfg)


def check_overrides(overrides: list[str]) -> None:
    """The rules OmegaConf does not enforce itself (strict booleans), as ConfigError."""
    try:
        config_schema.check_bool_overrides(overrides, TrainJobConfig)
    except config_schema.ConfigError as err:
        raise ConfigError(str(err)) from None


def experiment_from_hydra(cfg: DictConfig) -> ExperimentConfig:
    """The typed, validated experiment of a composed conf/ (``hydra`` and ``simulation`` are
    dropped: they say how a run is launched, not what it computes)."""
    return _typed(cfg, ExperimentConfig)


def job_config_from_hydra(cfg: DictConfig) -> TrainJobConfig:
    """The typed, validated ``fedserve-train`` job: the experiment and its ``simulation``."""
    return _typed(cfg, TrainJobConfig)


def _typed(cfg: DictConfig, schema: type[T]) -> T:
    try:
        return config_schema.typed_config(cfg, schema)
    except config_schema.ConfigError as err:
        raise ConfigError(str(err)) from None
