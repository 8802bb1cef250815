"""Partitioner properties: coverage, disjointness, determinism, skew, sizes and errors."""

from __future__ import annotations

import numpy as np
import pytest

from task.config import ConfigError, PartitionConfig
from task.partition import label_skew, partition_indices, split_train_val

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """2,000 labels over 10 classes with unequal class sizes (as real datasets have)."""
    rng = np.random.default_rng(123)
    p = rng.dirichlet(np.full(NUM_CLASSES, 20.0))
    return rng.choice(NUM_CLASSES, size=2000, p=p)


SCHEMES = [
    PartitionConfig(name="iid"),
    PartitionConfig(name="dirichlet", alpha=0.3, min_partition_size=10),
    PartitionConfig(name="shards", shards_per_client=2),
]


@pytest.mark.parametrize("cfg", SCHEMES, ids=lambda c: c.name)
def test_covering_and_disjoint(labels: np.ndarray, cfg: PartitionConfig) -> None:
    parts = partition_indices(labels, 10, cfg, seed=0)
    assert len(parts) == 10
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    assert len(joined) == len(labels)  # no sample twice ...
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(labels)))  # ... and none lost
    assert all(len(p) > 0 for p in parts)


@pytest.mark.parametrize("cfg", SCHEMES, ids=lambda c: c.name)
def test_deterministic_per_seed(labels: np.ndarray, cfg: PartitionConfig) -> None:
    a = partition_indices(labels, 10, cfg, seed=5)
    b = partition_indices(labels, 10, cfg, seed=5)
    c = partition_indices(labels, 10, cfg, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_is_balanced_and_unskewed(labels: np.ndarray) -> None:
    parts = partition_indices(labels, 10, PartitionConfig(name="iid"), seed=0)
    assert {len(p) for p in parts} == {200}
    assert label_skew(labels, parts, NUM_CLASSES) < 0.12


def test_label_skew_grows_as_alpha_shrinks(labels: np.ndarray) -> None:
    skews = []
    for alpha in (100.0, 1.0, 0.1):
        cfg = PartitionConfig(name="dirichlet", alpha=alpha, min_partition_size=5)
        skews.append(label_skew(labels, partition_indices(labels, 10, cfg, seed=1), NUM_CLASSES))
    assert skews[0] < skews[1] < skews[2], skews
    assert skews[0] < 0.1 and skews[2] > 0.5, skews


def test_label_skew_extremes() -> None:
    y = np.repeat(np.arange(4), 5)
    assert label_skew(y, [np.arange(20)], 4) == 0.0
    one_label_each = [np.flatnonzero(y == c) for c in range(4)]
    assert label_skew(y, one_label_each, 4) == pytest.approx(0.75)


@pytest.mark.parametrize("min_size", [1, 30, 60])
def test_dirichlet_honours_min_partition_size(labels: np.ndarray, min_size: int) -> None:
    cfg = PartitionConfig(name="dirichlet", alpha=0.5, min_partition_size=min_size)
    parts = partition_indices(labels, 20, cfg, seed=3)
    assert min(len(p) for p in parts) >= min_size


def test_dirichlet_gives_up_with_clear_error(labels: np.ndarray) -> None:
    cfg = PartitionConfig(name="dirichlet", alpha=0.01, min_partition_size=95)
    with pytest.raises(ConfigError, match="larger partition.alpha"):
        partition_indices(labels, 20, cfg, seed=0)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_limit_labels_per_client(labels: np.ndarray, k: int) -> None:
    parts = partition_indices(labels, 10, PartitionConfig(name="shards", shards_per_client=k), 0)
    assert max(len(np.unique(labels[p])) for p in parts) <= k
    sizes = [len(p) for p in parts]
    assert min(sizes) >= 0.5 * np.mean(sizes)  # shard sizes are evened out within classes


def test_shards_skew_exceeds_iid(labels: np.ndarray) -> None:
    shards = partition_indices(labels, 10, PartitionConfig(name="shards"), seed=0)
    iid = partition_indices(labels, 10, PartitionConfig(name="iid"), seed=0)
    assert label_skew(labels, shards, NUM_CLASSES) > 3 * label_skew(labels, iid, NUM_CLASSES)


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_alpha_must_be_positive(labels: np.ndarray, alpha: float) -> None:
    with pytest.raises(ConfigError, match=r"partition.alpha must be > 0"):
        partition_indices(labels, 10, PartitionConfig(name="dirichlet", alpha=alpha), seed=0)


@pytest.mark.parametrize(
    ("cfg", "clients"),
    [
        (PartitionConfig(name="iid"), 2001),
        (PartitionConfig(name="dirichlet", min_partition_size=10), 201),
        (PartitionConfig(name="shards", shards_per_client=2), 1001),
    ],
    ids=["iid", "dirichlet", "shards"],
)
def test_too_many_clients(labels: np.ndarray, cfg: PartitionConfig, clients: int) -> None:
    with pytest.raises(ConfigError, match=rf"num_clients={clients}.*2000 samples"):
        partition_indices(labels, clients, cfg, seed=0)


def test_one_sample_per_client_is_allowed() -> None:
    y = np.arange(7) % 2
    parts = partition_indices(y, 7, PartitionConfig(name="iid"), seed=0)
    assert sorted(int(p[0]) for p in parts) == list(range(7))


def test_split_train_val() -> None:
    idx = np.arange(100, 150)
    train, val = split_train_val(idx, 0.2, seed=0)
    assert len(val) == 10 and len(train) == 40
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), idx)
    again = split_train_val(idx, 0.2, seed=0)
    np.testing.assert_array_equal(again[1], val)
    assert not np.array_equal(split_train_val(idx, 0.2, seed=1)[1], val)
    tiny_train, tiny_val = split_train_val(np.array([3, 4]), 0.9, seed=0)
    assert len(tiny_train) == 1 and len(tiny_val) == 1
    lone_train, lone_val = split_train_val(np.array([8]), 0.5, seed=0)
    assert lone_train.tolist() == [8] and len(lone_val) == 0
    assert len(split_train_val(idx, 0.0, seed=0)[1]) == 0
