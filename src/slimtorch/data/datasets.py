"""Datasets as in-memory tensors: digits (shipped by scikit-learn) and MNIST/CIFAR-10 from ``.npz`` files.

The package never downloads: MNIST and CIFAR-10 are read from a folder the user gives (the layout of
``mnist_train.npz``, ``mnist_test.npz``, ``cifar10_test.npz``, ``cifar10_jpeg.npz``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slimtorch.errors import CheckpointError, ConfigError

__all__ = ["TensorSplit", "load_cifar10", "load_digits", "load_mnist"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class TensorSplit:
    """Train and test tensors: ``x`` float (N, C, H, W), ``y`` int64 (N,)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]

    def loader(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0):
        """A DataLoader over one split (``"train"`` or ``"test"``), deterministic given ``seed``."""
        from torch.utils.data import DataLoader, TensorDataset

        x, y = (self.x_train, self.y_train) if split == "train" else (self.x_test, self.y_test)
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> TensorSplit:
    """scikit-learn's 8x8 digits (1797 images), scaled to [0, 1] and standardised, split train/test."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set comes with scikit-learn: pip install 'slimtorch[demo]'") from err
    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return TensorSplit(x[train], y[train], x[test], y[test], tuple(str(i) for i in range(10)))


def _npz(path: Path) -> np.lib.npyio.NpzFile:
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} not found; pass the folder holding it with --data-dir")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{str(path)!r} is not a readable .npz file: {err}") from None


def load_mnist(data_dir: str | Path, *, limit: int | None = None) -> TensorSplit:
    """MNIST from ``mnist_train.npz`` / ``mnist_test.npz``, normalised with the usual mean and std."""
    data_dir = Path(data_dir)
    train, test = _npz(data_dir / "mnist_train.npz"), _npz(data_dir / "mnist_test.npz")

    def prep(x: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(x[:limit].astype(np.float32))[:, None] / 255.0 - 0.1307) / 0.3081

    return TensorSplit(
        prep(train["x"]), torch.from_numpy(train["y"][:limit].astype(np.int64)),
        prep(test["x"]), torch.from_numpy(test["y"][:limit].astype(np.int64)),
        tuple(str(i) for i in range(10)),
    )


def _decode_jpegs(raw: np.ndarray, offsets: np.ndarray, limit: int | None) -> np.ndarray:
    from PIL import Image

    count = len(offsets) - 1 if limit is None else min(limit, len(offsets) - 1)
    return np.stack(
        [np.asarray(Image.open(io.BytesIO(raw[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB"))
         for i in range(count)]
    )


def load_cifar10(data_dir: str | Path, *, limit: int | None = None, normalize: bool = True) -> TensorSplit:
    """CIFAR-10 from ``cifar10_jpeg.npz`` (50k train + 10k test, decoded with Pillow).

    ``normalize`` standardises each channel with the usual CIFAR-10 statistics; without it pixels are
    scaled to [0, 1] only (what the book's recipe does).
    """
    z = _npz(Path(data_dir) / "cifar10_jpeg.npz")
    x_train = _decode_jpegs(z["train_bytes"], z["train_offsets"], limit)
    x_test = _decode_jpegs(z["test_bytes"], z["test_offsets"], limit)

    def prep(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0  # (N, H, W, C) -> (N, C, H, W)
        if normalize:
            t = (t - torch.tensor(CIFAR10_MEAN)[:, None, None]) / torch.tensor(CIFAR10_STD)[:, None, None]
        return t

    n_train, n_test = len(x_train), len(x_test)
    return TensorSplit(
        prep(x_train), torch.from_numpy(z["train_y"][:n_train].astype(np.int64)),
        prep(x_test), torch.from_numpy(z["test_y"][:n_test].astype(np.int64)),
        tuple(str(c) for c in z["classes"]),
    )
