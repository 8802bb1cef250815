"""Partitioners: split training indices over clients, seeded and deterministic.

Every training sample lands in exactly one partition; each partition is a sorted int64 array of
indices into the training set. flwr-datasets' partitioners are not used: they are not installed,
work on Hugging Face ``datasets`` objects rather than in-memory arrays, and ``task/`` must not
depend on Flower, so the three schemes are implemented here in numpy:

- ``iid``: a seeded permutation cut into ``num_partitions`` near-equal parts.
- ``dirichlet``: for each class ``c``, proportions ``p_c ~ Dir(alpha * 1_K)`` over the K clients cut
  that class's (shuffled) samples; the draw is repeated until every client holds at least
  ``min_partition_size`` samples. Small alpha = strong label skew; large alpha -> IID.
- ``shards``: FedAvg's pathological non-IID (McMahan et al. 2017): samples sorted by label are cut
  into ``K * shards_per_client`` shards and each client gets ``shards_per_client`` random shards.
  Shards are cut *within* classes (shard counts per class by the D'Hondt rule, so sizes are as even
  as possible), hence a client with k shards holds at most k labels; with fewer shards than classes
  this is impossible and the sorted order is cut contiguously instead.
"""

from __future__ import annotations

import heapq
import logging

import numpy as np

from task.config import ConfigError, PartitionConfig

logger = logging.getLogger(__name__)

MAX_DIRICHLET_ATTEMPTS = 1000


def partition_indices(
    labels: np.ndarray, num_partitions: int, cfg: PartitionConfig, seed: int
) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into ``num_partitions`` disjoint, covering, sorted parts."""
    cfg.validate()
    labels = np.asarray(labels)
    n = len(labels)
    if num_partitions < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_partitions}")
    per_client = {
        "iid": 1,
        "dirichlet": cfg.min_partition_size,
        "shards": cfg.shards_per_client,
    }[cfg.name]
    if num_partitions * per_client > n:
        need = "1 sample" if per_client == 1 else f"{per_client} samples"
        raise ConfigError(
            f"num_clients={num_partitions} is too many for a training set of {n} samples "
            f"(partition={cfg.name} needs at least {need} per client); use fewer clients"
            + ("" if cfg.name == "iid" else " or a smaller per-client minimum")
        )
    rng = np.random.default_rng([7, int(seed) & 0xFFFFFFFF])
    if cfg.name == "iid":
        parts = np.array_split(rng.permutation(n), num_partitions)
    elif cfg.name == "dirichlet":
        parts = _dirichlet(labels, num_partitions, cfg, rng)
    else:
        parts = _shards(labels, num_partitions, cfg.shards_per_client, rng)
    out = [np.sort(p).astype(np.int64) for p in parts]
    logger.info(
        "partition %s over %d clients: sizes min %d max %d, label skew %.3f",
        cfg.name,
        num_partitions,
        min(len(p) for p in out),
        max(len(p) for p in out),
        label_skew(labels, out),
    )
    return out


def _dirichlet(
    labels: np.ndarray, k: int, cfg: PartitionConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    by_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    smallest = 0
    for _ in range(MAX_DIRICHLET_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(k)]
        for members in by_class:
            p = rng.dirichlet(np.full(k, cfg.alpha))
            cuts = (np.cumsum(p)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        smallest = min(len(p) for p in merged)
        if smallest >= cfg.min_partition_size:
            return merged
    raise ConfigError(
        f"partition=dirichlet with alpha={cfg.alpha} left a client below "
        f"min_partition_size={cfg.min_partition_size} in {MAX_DIRICHLET_ATTEMPTS} draws "
        f"(num_clients={k}, {len(labels)} samples, last smallest {smallest}); use a larger "
        "partition.alpha, fewer clients or a smaller partition.min_partition_size"
    )


def _shards(
    labels: np.ndarray, k: int, per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    num_shards = k * per_client
    classes = np.unique(labels)
    if num_shards >= len(classes):
        members = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
        counts = _dhondt([len(m) for m in members], num_shards)
        shards = [s for m, c in zip(members, counts, strict=True) for s in np.array_split(m, c)]
    else:
        order = rng.permutation(len(labels))
        order = order[np.argsort(labels[order], kind="stable")]
        shards = np.array_split(order, num_shards)
    assignment = rng.permutation(num_shards).reshape(k, per_client)
    return [np.concatenate([shards[s] for s in row]) for row in assignment]


def _dhondt(sizes: list[int], seats: int) -> list[int]:
    """One shard per class, then each further shard to the class with the largest shard size."""
    counts = [1] * len(sizes)
    heap = [(-size, i) for i, size in enumerate(sizes)]
    heapq.heapify(heap)
    for _ in range(seats - len(sizes)):
        _, i = heapq.heappop(heap)
        counts[i] += 1
        heapq.heappush(heap, (-sizes[i] / counts[i], i))
    return counts


def split_train_val(
    indices: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of one client's indices into sorted (train, val).

    ``n_val = round(n * val_fraction)``, capped at ``n - 1`` so at least one sample trains.
    """
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    if n == 0:
        raise ValueError("split_train_val got an empty partition; every client needs a sample")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"partition.val_fraction must be in [0, 1), got {val_fraction}")
    n_val = min(int(round(n * val_fraction)), n - 1)
    perm = np.random.default_rng([11, int(seed) & 0xFFFFFFFF]).permutation(indices)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def label_skew(
    labels: np.ndarray, parts: list[np.ndarray], num_classes: int | None = None
) -> float:
    """Mean total-variation distance between each client's label distribution and the global one.

    ``TV(p, q) = 1/2 * sum_c |p_c - q_c|``: 0 for IID parts, up to ``1 - q_c`` for a single label.
    """
    labels = np.asarray(labels)
    k = int(num_classes if num_classes is not None else labels.max() + 1)
    whole = np.bincount(labels, minlength=k) / len(labels)
    distances = []
    for part in parts:
        if len(part) == 0:
            continue
        local = np.bincount(labels[part], minlength=k) / len(part)
        distances.append(0.5 * float(np.abs(local - whole).sum()))
    return float(np.mean(distances)) if distances else 0.0
