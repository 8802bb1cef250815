"""Every dataset loader, on files the tests write themselves (no network)."""

from __future__ import annotations

import gzip
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from task.config import ConfigError, DatasetConfig
from task.data import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, load_dataset

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def write_idx(path: Path, array: np.ndarray, *, gz: bool, dims: list[int] | None = None) -> None:
    """An unsigned-byte IDX file; ``dims`` overrides the header (to make it lie)."""
    magic = IDX_IMAGES_MAGIC if array.ndim == 3 else IDX_LABELS_MAGIC
    header = magic.to_bytes(4, "big") + b"".join(
        int(d).to_bytes(4, "big") for d in (dims or array.shape)
    )
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def fake_images(n: int, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


def assert_normalised(x: torch.Tensor) -> None:
    assert x.dtype == torch.float32
    dims = (0, 2, 3)
    assert torch.allclose(x.mean(dim=dims), torch.zeros(x.shape[1]), atol=1e-4)
    assert torch.allclose(x.std(dim=dims), torch.ones(x.shape[1]), atol=1e-3)


def same_up_to_affine(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1]) > (
        1 - 1e-6
    )


def test_digits_shapes_split_and_normalisation() -> None:
    data = load_dataset(DatasetConfig(name="digits", test_fraction=0.2), seed=0)
    assert data.train_x.shape == (1438, 1, 8, 8) and data.test_x.shape == (359, 1, 8, 8)
    assert data.train_y.dtype == torch.int64 and data.num_classes == 10
    assert data.input_shape == (1, 8, 8) and data.name == "digits"
    assert_normalised(data.train_x)
    assert abs(float(data.test_x.mean())) < 0.1  # same statistics, not re-fitted on test
    test_share = np.bincount(data.test_y.numpy(), minlength=10) / 359
    assert np.all(np.abs(test_share - 0.1) < 0.02)  # stratified
    again = load_dataset(DatasetConfig(name="digits"), seed=0)
    other = load_dataset(DatasetConfig(name="digits"), seed=1)
    assert torch.equal(again.test_x, data.test_x)
    assert not torch.equal(other.test_x, data.test_x)


def test_limit_train_keeps_a_seeded_subset() -> None:
    full = load_dataset(DatasetConfig(name="digits"), seed=0)
    cut = load_dataset(DatasetConfig(name="digits", limit_train=100), seed=0)
    assert len(cut.train_y) == 100 and len(cut.test_y) == len(full.test_y)
    assert len(np.unique(cut.train_y.numpy())) == 10  # a shuffle, not the first 100 by class
    assert torch.equal(
        cut.train_y, load_dataset(DatasetConfig("digits", limit_train=100), 0).train_y
    )


@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_torchvision_mnist_family_from_raw_folder(tmp_path: Path, name: str, folder: str) -> None:
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    train_x, train_y = fake_images(40, (28, 28), seed=1)
    test_x, test_y = fake_images(12, (28, 28), seed=2)
    for split, x, y in (("train", train_x, train_y), ("t10k", test_x, test_y)):
        write_idx(raw / f"{split}-images-idx3-ubyte", x, gz=False)
        write_idx(raw / f"{split}-labels-idx1-ubyte", y, gz=False)
    data = load_dataset(DatasetConfig(name=name, root=str(tmp_path)), seed=0)
    assert data.train_x.shape == (40, 1, 28, 28) and data.test_x.shape == (12, 1, 28, 28)
    np.testing.assert_array_equal(data.train_y.numpy(), train_y)
    np.testing.assert_array_equal(data.test_y.numpy(), test_y)
    assert same_up_to_affine(data.train_x.numpy(), train_x)
    assert_normalised(data.train_x)


def _write_cifar(root: Path, n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (n_train, 3, 32, 32), dtype=np.uint8)
    train[:, 0] //= 4  # channels with different statistics
    test = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    batches = np.array_split(np.arange(n_train), 5)
    for i, rows in enumerate(batches, start=1):
        entry = {"data": train[rows].reshape(len(rows), -1), "labels": [int(r % 10) for r in rows]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(entry))
    entry = {"data": test.reshape(n_test, -1), "labels": [i % 10 for i in range(n_test)]}
    (folder / "test_batch").write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": [str(i) for i in range(10)]})
    )
    return train, test


def test_torchvision_cifar10_from_batches_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchvision checks every CIFAR file against the real archive's md5; the only thing patched is
    that checksum table, pointed at the files written here, so torchvision's own code still finds,
    verifies and unpickles them."""
    from torchvision.datasets import CIFAR10

    train, test = _write_cifar(tmp_path, n_train=25, n_test=7)
    folder = tmp_path / "cifar-10-batches-py"

    def md5(name: str) -> str:
        return hashlib.md5((folder / name).read_bytes()).hexdigest()

    monkeypatch.setattr(
        CIFAR10, "train_list", [[f"data_batch_{i}", md5(f"data_batch_{i}")] for i in range(1, 6)]
    )
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5("test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5("batches.meta")})
    data = load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path)), seed=0)
    assert data.train_x.shape == (25, 3, 32, 32) and data.test_x.shape == (7, 3, 32, 32)
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10
    np.testing.assert_array_equal(data.train_y.numpy(), np.arange(25) % 10)
    for c in range(3):  # channel layout survives (N, H, W, C) -> (N, C, H, W)
        assert same_up_to_affine(data.train_x[:, c].numpy(), train[:, c])
        assert same_up_to_affine(data.test_x[:, c].numpy(), test[:, c])
    assert_normalised(data.train_x)


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_torchvision_missing_files_is_a_config_error(tmp_path: Path, name: str) -> None:
    root = str(tmp_path / "nothing-here")
    with pytest.raises(ConfigError, match="dataset.root=.*nothing-here.*dataset.download=true"):
        load_dataset(DatasetConfig(name=name, root=root, download=False), seed=0)
    assert not (tmp_path / "nothing-here").exists() or not any(
        (tmp_path / "nothing-here").iterdir()
    )


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_idx_pair(tmp_path: Path, gz: bool) -> None:
    x, y = fake_images(60, (28, 28), seed=3)
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", x, gz=gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", y, gz=gz)
    data = load_dataset(DatasetConfig(name="idx", root=str(tmp_path), test_fraction=0.2), seed=0)
    assert data.train_x.shape == (48, 1, 28, 28) and data.test_x.shape == (12, 1, 28, 28)
    assert data.num_classes == 10
    assert_normalised(data.train_x)
    both_y = np.concatenate([data.train_y.numpy(), data.test_y.numpy()])
    np.testing.assert_array_equal(np.bincount(both_y), np.bincount(y))


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "plain"])
def test_idx_lying_header(tmp_path: Path, gz: bool) -> None:
    x, y = fake_images(60, (28, 28), seed=3)
    write_idx(tmp_path / "train-images-idx3-ubyte", x, gz=gz, dims=[70, 28, 28])
    write_idx(tmp_path / "train-labels-idx1-ubyte", y, gz=gz)
    expected, real = 16 + 70 * 784, 16 + 60 * 784
    with pytest.raises(ConfigError, match=rf"train-images-idx3-ubyte.*{expected}.*{real} bytes"):
        load_dataset(DatasetConfig(name="idx", root=str(tmp_path)), seed=0)


def test_idx_count_mismatch_and_bad_magic(tmp_path: Path) -> None:
    x, y = fake_images(60, (28, 28), seed=3)
    write_idx(tmp_path / "a-images-idx3-ubyte", x, gz=False)
    write_idx(tmp_path / "a-labels-idx1-ubyte", y[:50], gz=False)
    with pytest.raises(ConfigError, match="60 images but .* 50 labels"):
        load_dataset(DatasetConfig(name="idx", root=str(tmp_path)), seed=0)
    (tmp_path / "a-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 20)
    with pytest.raises(ConfigError, match="magic 0x00000803, expected 0x00000801"):
        load_dataset(DatasetConfig(name="idx", root=str(tmp_path)), seed=0)


def test_idx_pair_must_be_unique_and_present(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no file matching"):
        load_dataset(DatasetConfig(name="idx", root=str(tmp_path)), seed=0)
    x, y = fake_images(20, (8, 8), seed=0)
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", x, gz=False)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", y, gz=False)
    with pytest.raises(ConfigError, match="2 files"):
        load_dataset(DatasetConfig(name="idx", root=str(tmp_path)), seed=0)
    with pytest.raises(ConfigError, match="is not a folder"):
        load_dataset(DatasetConfig(name="idx", root=str(tmp_path / "absent")), seed=0)


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason="shared MNIST test set not present")
def test_idx_shared_mnist_benchmark_split() -> None:
    data = load_dataset(DatasetConfig(name="idx", root=str(SHARED_MNIST), test_fraction=0.2), 0)
    assert len(data.train_y) == 8000 and len(data.test_y) == 2000
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10


def test_synthetic_is_seeded_and_learnable() -> None:
    cfg = DatasetConfig(name="synthetic", num_samples=600, num_classes=4, image_size=6, channels=3)
    data = load_dataset(cfg, seed=0)
    assert data.train_x.shape == (480, 3, 6, 6) and data.input_shape == (3, 6, 6)
    assert data.num_classes == 4
    assert_normalised(data.train_x)
    assert torch.equal(load_dataset(cfg, seed=0).train_x, data.train_x)
    assert not torch.equal(load_dataset(cfg, seed=1).train_x, data.train_x)
    x_tr, y_tr = data.train_x.flatten(1), data.train_y
    centroids = torch.stack([x_tr[y_tr == c].mean(0) for c in range(4)])
    predicted = torch.cdist(data.test_x.flatten(1), centroids).argmin(1)
    assert float((predicted == data.test_y).float().mean()) > 0.9


def test_unknown_dataset_and_missing_root() -> None:
    with pytest.raises(ConfigError, match="dataset.name must be one of"):
        load_dataset(DatasetConfig(name="imagenet"), seed=0)
    with pytest.raises(ConfigError, match="dataset.root must be set"):
        load_dataset(DatasetConfig(name="mnist"), seed=0)
