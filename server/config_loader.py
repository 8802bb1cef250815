"""Compose conf/ into the typed :class:`ExperimentConfig` (Hydra's Compose API).

``flwr run .`` carries Hydra overrides in the run-config key ``overrides``
(``--run-config 'overrides="strategy=fedadam partition=dirichlet partition.alpha=0.3"'``); the
ServerApp composes conf/ with them here, exactly as ``fedserve-train`` does with its command line.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from task.config import ConfigError, ExperimentConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


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
    """Compose ``conf/config.yaml`` with ``overrides`` and validate it."""
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    except HydraException as err:
        raise ConfigError(f"cannot compose conf/ with overrides {overrides}: {err}") from err
    return experiment_from_hydra(cfg)


def experiment_from_hydra(cfg: DictConfig) -> ExperimentConfig:
    """The typed config of a composed Hydra config (the ``hydra`` node, if any, is dropped)."""
    data = to_container(cfg)
    data.pop("hydra", None)
    return ExperimentConfig.from_dict(data)


def to_container(cfg: DictConfig) -> dict[str, Any]:
    missing = sorted(_missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} must be set (it is '???' in conf/); "
            f"pass it as an override, e.g. {missing[0]}=<value>"
        )
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"cannot resolve the config: {err}") from err
    assert isinstance(data, dict)
    return data  # type: ignore[return-value]


def _missing_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    missing: list[str] = []
    for key in cfg:
        if key == "hydra":
            continue
        path = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            missing.append(path)
            continue
        value = cfg[key]
        if isinstance(value, DictConfig):
            missing.extend(_missing_keys(value, prefix=f"{path}."))
    return missing
