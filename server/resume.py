"""Resuming a run (``resume=true``): every check, before anything starts.

:func:`check_resume` is called by ``fedserve-train`` before the SuperLink and Ray start (so a
refusal costs no start-up) and again by the ServerApp (``flwr run .`` has no earlier point). Each
refusal is one line (:class:`ResumeError`, a ConfigError: exit code 2):

* ``resume=true`` without a checkpoint in the output directory;
* a checkpoint that cannot be read or whose checksum does not match (:mod:`server.checkpoint`);
* a checkpoint of another state format, or of Flower's FedAvg (which keeps no state);
* a config that differs from the checkpoint's run in anything that shapes the run: the model,
  the data and its partition, the seed, local training, the strategy and its optimizer's
  hyper-parameters, the emulation knobs. Keys in :data:`FREE` are operational and may change
  (more ``rounds`` is what resuming is for). A deliberate change is named in
  ``resume_allow_changes`` (``resume_allow_changes=[strategy.server_lr]``; a section name allows
  every key under it), except the keys in :data:`FIXED`: a checkpoint of another model, dataset
  shape or optimizer cannot be continued at all.

Nothing is written before the checks passed (``config.json`` included).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from server.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from server.config import ExperimentConfig
from server.strategy.state import STATE_FORMAT
from task.config import ConfigError

log = logging.getLogger(__name__)

#: may change on resume: where things go, how long to wait, when to stop, what to export
FREE = (
    "rounds",
    "output_dir",
    "repository",
    "resume",
    "resume_allow_changes",
    "stop_at_accuracy",
    "device",
    "export",
    "dataset.root",
    "dataset.download",
    "train.num_workers",
    "strategy.name",
    "strategy.round_timeout_s",
    "strategy.discovery_timeout_s",
    "strategy.max_round_retries",
    "strategy.publish_in_background",
)
#: never change on resume: the checkpoint's arrays and optimizer state belong to these
FIXED = (
    "model.name",
    "dataset.name",
    "dataset.channels",
    "dataset.image_size",
    "dataset.num_classes",
    "strategy.implementation",
    "strategy.optimizer",
)


class ResumeError(ConfigError):
    """The run cannot resume from its checkpoint; the message says why and what to do."""


def checkpoint_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_NAME


def check_resume(cfg: ExperimentConfig, output_dir: str | Path) -> dict[str, Any] | None:
    """The verified checkpoint to resume from, or None for a fresh run; :class:`ResumeError`
    (one line) when ``cfg`` cannot resume from what ``output_dir`` holds."""
    check_allowed_keys(cfg.resume_allow_changes)
    if not cfg.resume:
        return None
    path = checkpoint_path(output_dir)
    if cfg.strategy.implementation == "flower_fedavg":
        raise ResumeError(
            "resume=true needs strategy.implementation=parameter_server; flower_fedavg is the "
            "reference strategy and keeps no server state to resume"
        )
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as exc:
        raise ResumeError(str(exc)) from None
    if checkpoint is None:
        raise ResumeError(
            f"resume=true but there is no checkpoint at {path}; start without resume=true, or "
            "set output_dir (hydra.run.dir) to the run to resume"
        )
    found = checkpoint.get("format")
    if found != STATE_FORMAT or not isinstance(checkpoint.get("config"), dict):
        raise ResumeError(
            f"checkpoint {path} has state format {found!r}, this fedserve writes {STATE_FORMAT}: "
            "it was written by another version; start without resume=true (or in another "
            "output_dir)"
        )
    check_config(checkpoint["config"], cfg, path)
    log.info("resuming from %s at version %d", path, checkpoint["version"])
    return checkpoint


def check_allowed_keys(allowed: list[str]) -> None:
    """Every ``resume_allow_changes`` entry names a key (or section) that may be allowed."""
    known = flatten(ExperimentConfig().to_dict())
    for entry in allowed:
        named = [key for key in known if _covered(key, (entry,))]
        if not named:
            raise ConfigError(
                f"resume_allow_changes names {entry!r}, which is no config key; name keys as "
                "on the command line, e.g. resume_allow_changes=[strategy.server_lr,train.lr]"
            )
        if all(_covered(key, FIXED) for key in named):  # a section allows its other keys
            raise ConfigError(
                f"resume_allow_changes cannot allow {entry}: the checkpoint's arrays and "
                "optimizer state belong to its value; start a new run instead"
            )


def check_config(saved: dict[str, Any], cfg: ExperimentConfig, path: Path) -> None:
    """Refuse a config that differs from the checkpoint's in a key that is neither free nor
    allowed, naming every such key with both values."""
    defaults = flatten(ExperimentConfig().to_dict())
    before = {**defaults, **flatten(saved)}
    now = flatten(cfg.to_dict())
    changed = [key for key in now if before.get(key) != now[key] and not _covered(key, FREE)]
    fixed = [key for key in changed if _covered(key, FIXED)]
    if fixed:
        raise ResumeError(
            f"checkpoint {path} was written for {_values(fixed, before, now)}: resume cannot "
            "change that; resume with the run's values or start a new run in another output_dir"
        )
    refused = [key for key in changed if not _covered(key, tuple(cfg.resume_allow_changes))]
    if refused:
        raise ResumeError(
            f"the config differs from the run in {path}: {_values(refused, before, now)}; "
            "resume with the run's values, or allow deliberate changes with "
            f"'resume_allow_changes=[{','.join(refused)}]'"
        )
    if changed:
        log.warning("resuming with %s (resume_allow_changes)", _values(changed, before, now))


def _covered(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _values(keys: list[str], before: dict[str, Any], now: dict[str, Any]) -> str:
    return ", ".join(f"{key}={before.get(key)!r} (now {now[key]!r})" for key in keys)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
