"""The parameter server's configuration: the schema of conf/'s ``strategy/`` group.

OmegaConf checks each value's type when Hydra composes the group; :meth:`StrategyConfig.validate`
checks ranges and combinations, naming the key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

from task.config import ConfigError, check_choice, check_non_negative, check_positive

MODES = ("sync", "async")
OPTIMIZERS = ("sgd", "adam", "yogi", "adagrad")
AGGREGATIONS = ("mean", "trimmed_mean")
SELECTIONS = ("uniform", "balanced")
IMPLEMENTATIONS = ("parameter_server", "flower_fedavg")


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
    round_timeout_s: float = 600.0  # a round's deadline (async: a reply's), the messages' TTL
    max_round_retries: int = 3
    # start-up: waiting for the nodes, and their partition-id answers (each client loads its data
    # first), whatever the round deadline
    discovery_timeout_s: float = 600.0
    # async (FedBuff)
    buffer_size: int = 5
    concurrency: int = 10
    max_staleness: int = 10
    # which idle client a free slot goes to: uniform (FedBuff) or balanced (sent the fewest)
    selection: str = "uniform"
    # validation and robustness
    # reject a reply whose update norm exceeds this x the median of the recent update norms
    # (server/strategy/norm_filter.py: bounds what one bad client can do; null = off). Honest
    # cnn/mlp clients on digits (iid, dirichlet 0.1-0.3, shards; 4 rounds) reached 1.1-4.9x
    # their round's median: 10 leaves twice that margin
    max_norm_ratio: float | None = 10.0
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
        check_choice("strategy.implementation", self.implementation, IMPLEMENTATIONS)
        check_choice("strategy.mode", self.mode, MODES)
        check_choice("strategy.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("strategy.aggregation", self.aggregation, AGGREGATIONS)
        check_choice("strategy.selection", self.selection, SELECTIONS)
        check_positive("strategy.server_lr", self.server_lr)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"strategy.momentum must be in [0, 1), got {self.momentum}")
        for key in ("beta1", "beta2"):
            value = getattr(self, key)
            if not 0 <= value < 1:
                raise ConfigError(f"strategy.{key} must be in [0, 1), got {value}")
        check_positive("strategy.tau", self.tau)
        if not 0 < self.fraction_train <= 1:
            raise ConfigError(
                f"strategy.fraction_train must be in (0, 1], got {self.fraction_train}"
            )
        if not 0 <= self.fraction_evaluate <= 1:
            raise ConfigError(
                f"strategy.fraction_evaluate must be in [0, 1], got {self.fraction_evaluate}"
            )
        check_positive("strategy.min_replies", self.min_replies)
        check_positive("strategy.round_timeout_s", self.round_timeout_s)
        check_positive("strategy.discovery_timeout_s", self.discovery_timeout_s)
        check_non_negative("strategy.max_round_retries", self.max_round_retries)
        check_positive("strategy.buffer_size", self.buffer_size)
        check_positive("strategy.concurrency", self.concurrency)
        check_non_negative("strategy.max_staleness", self.max_staleness)
        if self.max_norm_ratio is not None and not self.max_norm_ratio > 1:
            raise ConfigError(
                f"strategy.max_norm_ratio must be > 1 (or null: off), got {self.max_norm_ratio}"
            )
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
