"""Datasets by name, loaded into memory as normalised tensors.

``load_dataset(cfg, seed)`` returns a :class:`FederatedData`: ``train_x``/``test_x`` of shape
``(N, C, H, W)`` float32, ``train_y``/``test_y`` int64. Pixels are scaled to ``[0, 1]`` and then
normalised per channel with the *training* mean and standard deviation, ``x' = (x - mu_c) / sd_c``,
so no test statistic leaks into training. Names:

- ``digits``: scikit-learn's 1,797 8x8 digits (values 0..16), split by ``test_fraction``.
- ``mnist``, ``fashion_mnist``, ``cifar10``: torchvision's own train/test sets under ``root``;
  nothing is downloaded unless ``download`` is true.
- ``idx``: one images/labels pair of IDX files (gzip or plain) in ``root``, parsed here and checked
  against the file sizes, split by ``test_fraction``.
- ``synthetic``: seeded class prototypes plus Gaussian noise (learnable), split likewise.

Splits are stratified and seeded; ``limit_train`` keeps the first N training samples after a seeded
shuffle. Nothing is cached on disk. Every bad input raises :class:`~task.config.ConfigError`
naming the key, the value and the fix.
"""

from __future__ import annotations

import gzip
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from task.config import ConfigError, DatasetConfig

logger = logging.getLogger(__name__)

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
SYNTHETIC_NOISE = 1.0  # noise sd relative to the unit-variance class prototypes

_TORCHVISION = {
    "mnist": ("MNIST", "<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"),
    "fashion_mnist": (
        "FashionMNIST",
        "<root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte",
    ),
    "cifar10": ("CIFAR10", "<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}"),
}


@dataclass
class FederatedData:
    """A dataset held in memory: normalised float32 images and int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, int, int]
    name: str


def load_dataset(cfg: DatasetConfig, seed: int) -> FederatedData:
    """Load ``cfg.name`` into memory; the same ``(cfg, seed)`` gives the same tensors."""
    cfg.validate()
    loaders: dict[str, Callable[[DatasetConfig, int], tuple[np.ndarray, ...]]] = {
        "digits": _load_digits,
        "mnist": _load_torchvision,
        "fashion_mnist": _load_torchvision,
        "cifar10": _load_torchvision,
        "idx": _load_idx,
        "synthetic": _load_synthetic,
    }
    train_x, train_y, test_x, test_y = loaders[cfg.name](cfg, seed)
    if cfg.limit_train is not None and cfg.limit_train < len(train_y):
        keep = _rng(seed, 1).permutation(len(train_y))[: cfg.limit_train]
        train_x, train_y = train_x[keep], train_y[keep]
    tx, vx = _normalise(train_x, test_x)
    num_classes = (
        cfg.num_classes
        if cfg.name == "synthetic"
        else int(max(train_y.max(initial=0), test_y.max(initial=0))) + 1
    )
    data = FederatedData(
        train_x=tx,
        train_y=torch.from_numpy(np.ascontiguousarray(train_y, dtype=np.int64)),
        test_x=vx,
        test_y=torch.from_numpy(np.ascontiguousarray(test_y, dtype=np.int64)),
        num_classes=max(num_classes, 2),
        input_shape=(int(tx.shape[1]), int(tx.shape[2]), int(tx.shape[3])),
        name=cfg.name,
    )
    logger.info(
        "dataset %s: %d train / %d test, shape %s, %d classes",
        cfg.name,
        len(data.train_y),
        len(data.test_y),
        data.input_shape,
        data.num_classes,
    )
    return data


def _rng(seed: int, stream: int) -> np.random.Generator:
    """An independent generator per purpose, so e.g. the split does not move when limit changes."""
    return np.random.default_rng([stream, int(seed) & 0xFFFFFFFF])


def _normalise(train_x: np.ndarray, test_x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x - mean_c) / std_c`` per channel with training statistics; inputs are in [0, 1]."""
    tx = torch.from_numpy(np.ascontiguousarray(train_x, dtype=np.float32))
    vx = torch.from_numpy(np.ascontiguousarray(test_x, dtype=np.float32))
    std, mean = torch.std_mean(tx, dim=(0, 2, 3))
    std = std.clamp_min(1e-6)
    for x in (tx, vx):
        x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
    return tx, vx


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(len(labels))`` into sorted (train, test) index arrays.

    ``n_test = round(N * test_fraction)`` (at least 1, at most N - 1), shared out over the classes
    by largest remainder of ``n_c * n_test / N``, so class proportions match in both parts.
    """
    n = len(labels)
    if n < 2:
        raise ConfigError(f"a dataset of {n} sample(s) cannot be split into train and test")
    n_test = min(max(int(round(n * test_fraction)), 1), n - 1)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * n_test / n
    take = np.floor(quota).astype(np.int64)
    remainder_order = np.argsort(-(quota - take), kind="stable")
    take[remainder_order[: n_test - int(take.sum())]] += 1
    perm = _rng(seed, 0).permutation(n)
    shuffled = labels[perm]
    test = np.concatenate([perm[shuffled == c][:k] for c, k in zip(classes, take, strict=True)])
    is_test = np.zeros(n, dtype=bool)
    is_test[test] = True
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


def _split(x: np.ndarray, y: np.ndarray, cfg: DatasetConfig, seed: int) -> tuple[np.ndarray, ...]:
    train, test = stratified_split(y, cfg.test_fraction, seed)
    return x[train], y[train], x[test], y[test]


def _load_digits(cfg: DatasetConfig, seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    return _split(x, y.astype(np.int64), cfg, seed)


def _load_torchvision(cfg: DatasetConfig, seed: int) -> tuple[np.ndarray, ...]:
    """torchvision's train and test sets, read from its in-memory ``data``/``targets``."""
    import torchvision.datasets as tvd

    class_name, layout = _TORCHVISION[cfg.name]
    cls = getattr(tvd, class_name)
    parts: list[np.ndarray] = []
    for train in (True, False):
        try:
            ds = cls(root=cfg.root, train=train, download=cfg.download)
        except (RuntimeError, OSError) as exc:
            action = "download failed" if cfg.download else "files not found"
            raise ConfigError(
                f"dataset.root={cfg.root!r} does not hold {class_name} in torchvision's layout "
                f"({layout}): {action} ({exc}); set dataset.download=true or point dataset.root "
                "at the files"
            ) from exc
        data = np.asarray(ds.data, dtype=np.uint8)
        data = np.ascontiguousarray(data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2))
        x = data.astype(np.float32)
        x *= 1.0 / 255.0
        parts += [x, np.asarray(ds.targets, dtype=np.int64)]
    return tuple(parts)


def _load_idx(cfg: DatasetConfig, seed: int) -> tuple[np.ndarray, ...]:
    root = Path(str(cfg.root))
    images_path = _find_one(root, "*images*idx3*")
    labels_path = _find_one(root, "*labels*idx1*")
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise ConfigError(
            f"IDX pair in dataset.root={cfg.root!r} disagrees: {images_path.name} holds "
            f"{len(images)} images but {labels_path.name} holds {len(labels)} labels"
        )
    x = images[:, None].astype(np.float32) / 255.0
    return _split(x, labels.astype(np.int64), cfg, seed)


def _find_one(root: Path, pattern: str) -> Path:
    if not root.is_dir():
        raise ConfigError(
            f"dataset.root={str(root)!r} is not a folder; point dataset.root at the folder "
            "holding the IDX images/labels pair"
        )
    found = sorted(p for p in root.glob(pattern) if p.is_file())
    if len(found) != 1:
        what = (
            "no file" if not found else f"{len(found)} files ({', '.join(p.name for p in found)})"
        )
        raise ConfigError(
            f"dataset.root={str(root)!r} holds {what} matching {pattern!r}; it must hold exactly "
            "one images/labels pair, e.g. t10k-images-idx3-ubyte.gz + t10k-labels-idx1-ubyte.gz"
        )
    return found[0]


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file (gzip or plain) into an array of its header's dims.

    Layout: a big-endian uint32 magic ``0x000008DD`` (``DD`` = number of dims), ``DD`` big-endian
    uint32 sizes, then ``prod(sizes)`` bytes. The size the header implies must equal the
    (uncompressed) file size exactly, otherwise the header lies and this raises ConfigError.
    """
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ConfigError(f"IDX file {path} is not a readable gzip file: {exc}") from exc
    found = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if found != magic:
        shown = "none (file shorter than 4 bytes)" if found is None else f"0x{found:08x}"
        raise ConfigError(f"IDX file {path} has magic {shown}, expected 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"IDX file {path} is {len(raw)} bytes, shorter than its header")
    dims = [int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)]
    expected = header + math.prod(dims)
    if expected != len(raw):
        raise ConfigError(
            f"IDX file {path}: header dims {dims} imply {expected} bytes but the file holds "
            f"{len(raw)} bytes (uncompressed); the header lies or the file is truncated"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_synthetic(cfg: DatasetConfig, seed: int) -> tuple[np.ndarray, ...]:
    """``x = P[y] + SYNTHETIC_NOISE * eps`` with seeded prototypes ``P ~ N(0, 1)`` per class.

    Classes are balanced (``y = i mod K`` shuffled); values are squashed to [0, 1] with a
    logistic so that every dataset enters normalisation on the same scale.
    """
    rng = _rng(seed, 2)
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    prototypes = rng.standard_normal((cfg.num_classes, *shape))
    y = rng.permutation(np.arange(cfg.num_samples) % cfg.num_classes).astype(np.int64)
    z = prototypes[y] + SYNTHETIC_NOISE * rng.standard_normal((cfg.num_samples, *shape))
    x = (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    return _split(x, y, cfg, seed)
