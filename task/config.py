"""The typed experiment configuration: one dataclass tree built from the composed conf/.

Hydra composes ``conf/`` (for ``fedserve-train`` and for the ServerApp of ``flwr run .``); the
resulting plain dict goes through :func:`ExperimentConfig.from_dict`, which rejects unknown keys
and bad values with a message that names the key, the value and what is allowed. Validation runs
before anything starts, so a bad config never costs a simulation start-up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "idx", "synthetic")
PARTITIONERS = ("iid", "dirichlet", "shards")
MODELS = ("mlp", "cnn", "resnet18")
MODES = ("sync", "async")
OPTIMIZERS = ("sgd", "adam", "yogi", "adagrad")
AGGREGATIONS = ("mean", "trimmed_mean")
SELECTIONS = ("uniform", "balanced")
IMPLEMENTATIONS = ("parameter_server", "flower_fedavg")


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
        _choice("dataset.name", self.name, DATASETS)
        if self.name in ("mnist", "fashion_mnist", "cifar10", "idx") and not self.root:
            raise ConfigError(
                f"dataset.root must be set for dataset.name={self.name!r}, got {self.root!r}; "
                "pass dataset.root=<folder holding the files>"
            )
        _open_unit("dataset.test_fraction", self.test_fraction)
        _positive("dataset.num_samples", self.num_samples)
        if self.num_classes < 2:
            raise ConfigError(f"dataset.num_classes must be >= 2, got {self.num_classes}")
        _positive("dataset.image_size", self.image_size)
        if self.channels not in (1, 3):
            raise ConfigError(f"dataset.channels must be 1 or 3, got {self.channels}")
        if self.limit_train is not None:
            _positive("dataset.limit_train", self.limit_train)


@dataclass
class PartitionConfig:
    """How the training set is split over clients, and each client's validation share."""

    name: str = "iid"
    alpha: float = 0.5  # dirichlet concentration: small = label skew
    min_partition_size: int = 10  # dirichlet resamples until every client has this many
    shards_per_client: int = 2  # shards: FedAvg's pathological non-IID
    val_fraction: float = 0.1

    def validate(self) -> None:
        _choice("partition.name", self.name, PARTITIONERS)
        if not self.alpha > 0:
            raise ConfigError(f"partition.alpha must be > 0, got {self.alpha}")
        if self.min_partition_size < 1:
            raise ConfigError(
                f"partition.min_partition_size must be >= 1, got {self.min_partition_size}"
            )
        _positive("partition.shards_per_client", self.shards_per_client)
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"partition.val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class ModelConfig:
    name: str = "cnn"

    def validate(self) -> None:
        _choice("model.name", self.name, MODELS)


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
        _positive("train.local_epochs", self.local_epochs)
        _positive("train.batch_size", self.batch_size)
        _positive("train.lr", self.lr)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"train.momentum must be in [0, 1), got {self.momentum}")
        _non_negative("train.weight_decay", self.weight_decay)
        _non_negative("train.proximal_mu", self.proximal_mu)
        _non_negative("train.num_workers", self.num_workers)


@dataclass
class StrategyConfig:
    """The server: a ParameterServer (optimizer + mode) or Flower's FedAvg as the reference.

    ``x <- opt(x, g)`` with the pseudo-gradient ``g = -weighted_mean(deltas)``.
    """

    name: str = "fedavg"
    implementation: str = "parameter_server"
    mode: str = "sync"
    optimizer: str = "sgd"
    server_lr: float = 1.0
    momentum: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0  # federated evaluation on clients' validation splits
    min_replies: int = 1
    round_timeout_s: float = 600.0
    max_round_retries: int = 3
    # async (FedBuff)
    buffer_size: int = 5
    concurrency: int = 10
    max_staleness: int = 10
    # which idle client a free slot goes to: uniform (FedBuff) or balanced (sent the fewest)
    selection: str = "uniform"
    # validation and robustness
    max_update_norm: float | None = None  # reject replies whose delta norm exceeds this
    clip_update_norm: float | None = None  # clip the server update to this norm
    aggregation: str = "mean"
    trim_fraction: float = 0.1
    # evaluate / record / checkpoint / export each version on a worker thread while the clients
    # already train on it (server/strategy/sink.py); off: the loop waits for them
    publish_in_background: bool = False
    # publish (evaluate, checkpoint, export) an exponential moving average of the versions with
    # this decay instead of the last version; clients still train from the last (0 = off)
    ema_decay: float = 0.0

    def validate(self) -> None:
        _choice("strategy.implementation", self.implementation, IMPLEMENTATIONS)
        _choice("strategy.mode", self.mode, MODES)
        _choice("strategy.optimizer", self.optimizer, OPTIMIZERS)
        _choice("strategy.aggregation", self.aggregation, AGGREGATIONS)
        _choice("strategy.selection", self.selection, SELECTIONS)
        _positive("strategy.server_lr", self.server_lr)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"strategy.momentum must be in [0, 1), got {self.momentum}")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            if not 0 <= value < 1:
                raise ConfigError(f"strategy.{key} must be in [0, 1), got {value}")
        _positive("strategy.tau", self.tau)
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(
                f"strategy.fraction_train must be in (0, 1], got {self.fraction_train}"
            )
        if not 0 <= self.fraction_evaluate <= 1:
            raise ConfigError(
                f"strategy.fraction_evaluate must be in [0, 1], got {self.fraction_evaluate}"
            )
        _positive("strategy.min_replies", self.min_replies)
        _positive("strategy.round_timeout_s", self.round_timeout_s)
        _non_negative("strategy.max_round_retries", self.max_round_retries)
        _positive("strategy.buffer_size", self.buffer_size)
        _positive("strategy.concurrency", self.concurrency)
        _non_negative("strategy.max_staleness", self.max_staleness)
        for key in ("max_update_norm", "clip_update_norm"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"strategy.{key} must be > 0 or null, got {value}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError(
                f"strategy.trim_fraction must be in [0, 0.5), got {self.trim_fraction}"
            )
        if self.implementation == "flower_fedavg" and self.mode != "sync":
            raise ConfigError("strategy.mode must be 'sync' for flower_fedavg, got 'async'")
        if not isinstance(self.publish_in_background, bool):
            raise ConfigError(
                "strategy.publish_in_background must be true or false, got "
                f"{self.publish_in_background!r}"
            )
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(
                f"strategy.ema_decay must be in [0, 1) (0 = off), got {self.ema_decay}"
            )
        if self.implementation == "flower_fedavg" and self.ema_decay:
            raise ConfigError(
                "strategy.ema_decay needs implementation=parameter_server; flower_fedavg "
                "publishes Flower's own aggregate: set it to 0"
            )
        if self.implementation == "flower_fedavg" and self.publish_in_background:
            raise ConfigError(
                "strategy.publish_in_background=true needs implementation=parameter_server; "
                "flower_fedavg runs Flower's own loop: set it to false"
            )


@dataclass
class ExportConfig:
    """When and how global models become ONNX versions in the model repository."""

    enabled: bool = True
    model_name: str = "fedserve"
    every: int = 1  # export every N global versions (0 = only at the end / on best)
    at_end: bool = True
    on_best: bool = True
    opset: int = 18
    atol: float = 1e-4
    keep_last: int = 5
    keep_best: bool = True
    max_batch_size: int = 64

    def validate(self) -> None:
        _non_negative("export.every", self.every)
        _positive("export.atol", self.atol)
        _positive("export.keep_last", self.keep_last)
        _positive("export.max_batch_size", self.max_batch_size)
        if not 7 <= self.opset <= 23:
            raise ConfigError(f"export.opset must be in [7, 23], got {self.opset}")


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


@dataclass
class ExperimentConfig:
    """One federated run: the same dict gives the same run (``fedserve-train`` or ``flwr run``)."""

    rounds: int = 5
    num_clients: int = 10
    seed: int = 0
    output_dir: str | None = None
    repository: str | None = "model_repository"
    resume: bool = False
    device: str = "auto"  # auto | cpu | cuda
    stop_at_accuracy: float | None = None  # stop after the first version reaching this test acc
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    heterogeneity: HeterogeneityConfig = field(default_factory=HeterogeneityConfig)

    def validate(self) -> None:
        _positive("rounds", self.rounds)
        _positive("num_clients", self.num_clients)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be one of auto, cpu, cuda, got {self.device!r}")
        if self.stop_at_accuracy is not None and not 0 < self.stop_at_accuracy <= 1:
            raise ConfigError(
                f"stop_at_accuracy must be in (0, 1] or null, got {self.stop_at_accuracy}"
            )
        for section in (
            self.dataset,
            self.partition,
            self.model,
            self.train,
            self.strategy,
            self.export,
            self.heterogeneity,
        ):
            section.validate()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        """Build and validate; unknown keys are errors (a typo must not be silently ignored)."""
        config = _build(cls, data, prefix="")
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


T = TypeVar("T")


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


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _non_negative(key: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{key} must be >= 0, got {value}")


def _open_unit(key: str, value: float) -> None:
    if not 0 < value < 1:
        raise ConfigError(f"{key} must be in (0, 1), got {value}")
