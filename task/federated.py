"""What one client holds: its partition of the training set, split into train and validation.

Deterministic in (dataset, partition, seed, partition id, number of partitions), so every process
that asks for the same client gets the same samples.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
import torch

from task.config import TaskConfig
from task.data import FederatedData, load_dataset
from task.partition import partition_indices, split_train_val


@dataclass(frozen=True)
class ClientData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]


def client_data(cfg: TaskConfig, partition_id: int, num_partitions: int) -> ClientData:
    """Partition ``partition_id`` of ``num_partitions`` (cached per process)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition-id must be in [0, {num_partitions}), got {partition_id}; "
            "check the SuperNode's --node-config"
        )
    return _client_data(dataset_key(cfg), cfg.seed, partition_id, num_partitions)


@functools.lru_cache(maxsize=4)
def _client_data(key: str, seed: int, partition_id: int, num_partitions: int) -> ClientData:
    sections = json.loads(key)
    cfg = TaskConfig.from_dict({**sections, "seed": seed})
    data = shared_dataset(key, seed)
    parts = _partitions(key, seed, num_partitions)
    train_idx, val_idx = split_train_val(
        parts[partition_id], cfg.partition.val_fraction, seed + partition_id
    )
    train_t = torch.as_tensor(np.sort(train_idx))
    val_t = torch.as_tensor(np.sort(val_idx))
    return ClientData(
        train_x=data.train_x[train_t],
        train_y=data.train_y[train_t],
        val_x=data.train_x[val_t],
        val_y=data.train_y[val_t],
        num_classes=data.num_classes,
        input_shape=data.input_shape,
    )


@functools.lru_cache(maxsize=2)
def _partitions(key: str, seed: int, num_partitions: int) -> list[np.ndarray]:
    """Every partition's indices, computed once per process: a simulation actor serves many
    partitions in turn, more than ``_client_data`` keeps, and each miss would otherwise split the
    whole dataset again (a Dirichlet split of 1,000 partitions is not cheap)."""
    sections = json.loads(key)
    cfg = TaskConfig.from_dict({**sections, "seed": seed})
    labels = shared_dataset(key, seed).train_y.numpy()
    return partition_indices(labels, num_partitions, cfg.partition, seed)


@functools.lru_cache(maxsize=2)
def shared_dataset(key: str, seed: int) -> FederatedData:
    """The whole dataset, loaded once per process for every client and the server's evaluation."""
    sections = json.loads(key)
    cfg = TaskConfig.from_dict({**sections, "seed": seed})
    return load_dataset(cfg.dataset, seed)


def check_partitions(cfg: TaskConfig, num_clients: int) -> None:
    """Raise ConfigError now if the training set cannot be split over ``num_clients`` as
    configured (e.g. more clients than samples), instead of in every client once the federation
    is up."""
    _partitions(dataset_key(cfg), cfg.seed, num_clients)


def dataset_key(cfg: TaskConfig) -> str:
    d = cfg.to_dict()
    return json.dumps({"dataset": d["dataset"], "partition": d["partition"]}, sort_keys=True)
