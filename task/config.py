"""The task's typed configuration: data, partition, model, local training, emulated devices.

These dataclasses are the schemas of conf/'s ``dataset/``, ``partition/`` and ``model/`` groups and
of the ``train``, ``heterogeneity`` and ``faults`` sections (Hydra structured configs, registered by
:mod:`server.config_loader`): OmegaConf checks every value's type as it composes, and
:meth:`TaskConfig.validate` checks ranges and combinations with messages that name the key, the
value and what is allowed. :class:`TaskConfig` is what a client rebuilds its task from (the server
sends it as JSON, :func:`build_config` reads it back), so the task knows nothing of the server's
strategy or of Flower.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "idx", "synthetic")
PARTITIONERS = ("iid", "dirichlet", "shards")
MODELS = ("mlp", "cnn", "resnet18")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key, the value and the fix."""


@dataclass
class DatasetConfig:
    """Which data, from where. ``root`` is needed by the torchvision and idx datasets."""

    name: str = "digits"
    root: str | None = None
    download: bool = False
    test_fraction: float = 0.2  # digits, idx and synthetic are split here; torchvision has its own
    num_samples: int = 2000  # synthetic only
    num_classes: int = 10  # synthetic only
    image_size: int = 8  # synthetic only
    channels: int = 1  # synthetic only
    limit_train: int | None = None  # keep only the first N training samples (after shuffling)

    def validate(self) -> None:
        check_choice("dataset.name", self.name, DATASETS)
        if self.name in ("mnist", "fashion_mnist", "cifar10", "idx") and not self.root:
            raise ConfigError(
                f"dataset.root must be set for dataset.name={self.name!r}, got {self.root!r}; "
                "pass dataset.root=<folder holding the files>"
            )
        check_open_unit("dataset.test_fraction", self.test_fraction)
        check_positive("dataset.num_samples", self.num_samples)
        if self.num_classes < 2:
            raise ConfigError(f"dataset.num_classes must be >= 2, got {self.num_classes}")
        check_positive("dataset.image_size", self.image_size)
        if self.channels not in (1, 3):
            raise ConfigError(f"dataset.channels must be 1 or 3, got {self.channels}")
        if self.limit_train is not None:
            check_positive("dataset.limit_train", self.limit_train)


@dataclass
class PartitionConfig:
    """How the training set is split over clients, and each client's validation share."""

    name: str = "iid"
    alpha: float = 0.5  # dirichlet concentration: small = label skew
    min_partition_size: int = 10  # dirichlet resamples until every client has this many
    shards_per_client: int = 2  # shards: FedAvg's pathological non-IID
    val_fraction: float = 0.1

    def validate(self) -> None:
        check_choice("partition.name", self.name, PARTITIONERS)
        if not self.alpha > 0:
            raise ConfigError(f"partition.alpha must be > 0, got {self.alpha}")
        if self.min_partition_size < 1:
            raise ConfigError(
                f"partition.min_partition_size must be >= 1, got {self.min_partition_size}"
            )
        check_positive("partition.shards_per_client", self.shards_per_client)
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"partition.val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class ModelConfig:
    name: str = "cnn"

    def validate(self) -> None:
        check_choice("model.name", self.name, MODELS)


@dataclass
class TrainConfig:
    """Client-side local training."""

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    proximal_mu: float = 0.0  # FedProx: mu/2 * ||w - w_global||^2
    num_workers: int = 0

    def validate(self) -> None:
        check_positive("train.local_epochs", self.local_epochs)
        check_positive("train.batch_size", self.batch_size)
        check_positive("train.lr", self.lr)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"train.momentum must be in [0, 1), got {self.momentum}")
        check_non_negative("train.weight_decay", self.weight_decay)
        check_non_negative("train.proximal_mu", self.proximal_mu)
        check_non_negative("train.num_workers", self.num_workers)


@dataclass
class HeterogeneityConfig:
    """Emulated device speeds (see client/heterogeneity.py): every client's training takes
    ``device_factor`` x its work, a seeded ``slow_fraction`` of them ``slow_factor`` x that."""

    slow_fraction: float = 0.0
    slow_factor: float = 1.0
    device_factor: float = 1.0

    def validate(self) -> None:
        if not 0 <= self.slow_fraction <= 1:
            raise ConfigError(
                f"heterogeneity.slow_fraction must be in [0, 1], got {self.slow_fraction}"
            )
        if self.slow_factor < 1:
            raise ConfigError(f"heterogeneity.slow_factor must be >= 1, got {self.slow_factor}")
        if self.device_factor < 1:
            raise ConfigError(
                f"heterogeneity.device_factor must be >= 1 (1: this machine's speed), "
                f"got {self.device_factor}"
            )


FAULTS = ("crash", "straggle", "nan", "wrong_shape", "scale")


@dataclass
class FaultsConfig:
    """Injected client faults for reliability tests and the chaos benchmark (applied by
    client/faults.py); all off by default.

    Each ``<kind>_fraction`` makes ``round(fraction · n)`` of the n partitions faulty, the kinds
    on disjoint, seeded sets: ``crash`` (training raises), ``straggle`` (the emulated device
    takes ``straggle_factor`` x the message's deadline, so no reply comes in time), ``nan`` (the
    update holds NaN), ``wrong_shape`` (one array of the update has one element too many),
    ``scale`` (the update is multiplied by ``scale_factor``). ``per_round``: the sets are drawn
    again for every global version, else they hold for the whole run. The draw depends on
    ``seed`` and the run's seed only.
    """

    crash_fraction: float = 0.0
    straggle_fraction: float = 0.0
    nan_fraction: float = 0.0
    wrong_shape_fraction: float = 0.0
    scale_fraction: float = 0.0
    scale_factor: float = 1000.0
    straggle_factor: float = 3.0
    per_round: bool = False
    seed: int = 0

    def fractions(self) -> dict[str, float]:
        """``{kind: fraction}`` in :data:`FAULTS` order."""
        return {kind: getattr(self, f"{kind}_fraction") for kind in FAULTS}

    def enabled(self) -> bool:
        return any(fraction > 0 for fraction in self.fractions().values())

    def validate(self) -> None:
        for kind, fraction in self.fractions().items():
            if not 0 <= fraction <= 1:
                raise ConfigError(f"faults.{kind}_fraction must be in [0, 1], got {fraction}")
        total = sum(self.fractions().values())
        if total > 1:
            raise ConfigError(
                f"the faults.*_fraction values add up to {total:g} > 1; each faulty client has "
                "one fault: lower them"
            )
        if self.straggle_factor <= 1:
            raise ConfigError(
                f"faults.straggle_factor must be > 1 (a straggler misses its deadline), "
                f"got {self.straggle_factor}"
            )


T = TypeVar("T")
C = TypeVar("C", bound="TaskConfig")


@dataclass
class TaskConfig:
    """What every client and the server's evaluation need to rebuild the task: the same dict
    gives the same data, partition, model and local training."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    heterogeneity: HeterogeneityConfig = field(default_factory=HeterogeneityConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

    def validate(self) -> None:
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        sections = (
            self.dataset,
            self.partition,
            self.model,
            self.train,
            self.heterogeneity,
            self.faults,
        )
        for section in sections:
            section.validate()

    def task_dict(self) -> dict[str, Any]:
        """The task's sections only (also of a subclass's instance): what clients are sent."""
        data = asdict(self)
        return {f.name: data[f.name] for f in fields(TaskConfig)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Built from a plain dict and validated (:func:`build_config`)."""
        return build_config(cls, data)


def build_config(cls: type[T], data: dict[str, Any]) -> T:
    """``cls`` built from a plain dict and validated; unknown keys are errors (a typo must not be
    silently ignored). For dicts that did not come through Hydra (e.g. the JSON clients get)."""
    config = _build(cls, data, prefix="")
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def _build(cls: type[T], data: dict[str, Any], prefix: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"allowed under {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(known))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        default = known[name].default_factory  # type: ignore[misc]
        if default is not dataclasses.MISSING and dataclasses.is_dataclass(default):
            kwargs[name] = _build(default, value or {}, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def check_non_negative(key: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{key} must be >= 0, got {value}")


def check_open_unit(key: str, value: float) -> None:
    if not 0 < value < 1:
        raise ConfigError(f"{key} must be in (0, 1), got {value}")
