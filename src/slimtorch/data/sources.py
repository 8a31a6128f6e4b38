"""Datasets by name for the command line and recipes: digits (offline, always there), MNIST and CIFAR-10
from the ``.npz`` files of a data folder, and ImageFolder trees (``train/<class>/*.png``, ``test/`` or ``val/``).

    >>> from slimtorch.data.sources import load_dataset
    >>> data = load_dataset("digits", limit=100)
    >>> tuple(data.x_train.shape), len(data.classes)
    ((100, 1, 8, 8), 10)
"""

from __future__ import annotations

from pathlib import Path

import torch

from slimtorch.data.datasets import TensorSplit, load_cifar10, load_digits, load_mnist
from slimtorch.errors import ConfigError, closest

__all__ = ["DATASETS", "load_dataset", "load_image_folder"]

DATASETS = ("digits", "mnist", "cifar10", "imagefolder")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff"}


def _subset(split: TensorSplit, limit: int | None) -> TensorSplit:
    if limit is None:
        return split
    return TensorSplit(split.x_train[:limit], split.y_train[:limit], split.x_test[:limit], split.y_test[:limit],
                       split.classes)


def _folder_split(root: Path, image_size: int | None, limit: int | None, seed: int) -> tuple[torch.Tensor, ...]:
    from torchvision import datasets, transforms

    steps = [transforms.Resize((image_size, image_size))] if image_size else []
    folder = datasets.ImageFolder(str(root), transform=transforms.Compose([*steps, transforms.ToTensor()]))
    order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed))
    order = order[:limit] if limit is not None else order  # a random subset: folders are sorted by class
    images = [folder[int(i)] for i in order]
    shapes = {tuple(x.shape) for x, _ in images}
    if len(shapes) > 1:
        raise ConfigError(f"images under {str(root)!r} have different sizes {sorted(shapes)[:3]}; pass --image-size")
    x = torch.stack([x for x, _ in images])  # (N, C, H, W) in [0, 1]
    return x, torch.tensor([y for _, y in images]), tuple(folder.classes)


def load_image_folder(
    data_dir: str | Path, *, image_size: int | None = None, limit: int | None = None, seed: int = 0
) -> TensorSplit:
    """An ImageFolder tree (``train/`` and ``test/`` or ``val/``, one sub-folder per class) as tensors,
    standardised per channel with the training split's statistics."""
    root = Path(data_dir)
    test_dir = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise ConfigError(f"{str(root)!r} is not an ImageFolder tree: it needs train/ and test/ (or val/) "
                          "sub-folders with one folder of images per class")
    try:
        x_train, y_train, classes = _folder_split(root / "train", image_size, limit, seed)
        x_test, y_test, test_classes = _folder_split(test_dir, image_size, limit, seed)
    except (FileNotFoundError, OSError) as err:
        raise ConfigError(f"cannot read images under {str(root)!r}: {err}") from None
    if classes != test_classes:
        raise ConfigError(f"train/ and {test_dir.name}/ hold different classes: {classes} vs {test_classes}")
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)  # (1, C, 1, 1) per-channel statistics
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return TensorSplit((x_train - mean) / std, y_train, (x_test - mean) / std, y_test, classes)


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    normalize: bool = True,
    image_size: int | None = None,
    seed: int = 0,
) -> TensorSplit:
    """Load a dataset by name (one of :data:`DATASETS`); ``limit`` keeps the first samples of each split."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; {closest(name, DATASETS)}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of samples, got {limit}")
    if name == "digits":
        return _subset(load_digits(seed=seed), limit)
    if data_dir is None:
        raise ConfigError(f"dataset {name!r} is read from local files: pass --data-dir (the folder holding them)")
    if not Path(data_dir).is_dir():
        raise ConfigError(f"--data-dir {str(data_dir)!r} is not a folder")
    if name == "mnist":
        return load_mnist(data_dir, limit=limit)
    if name == "cifar10":
        return load_cifar10(data_dir, limit=limit, normalize=normalize)
    return load_image_folder(data_dir, image_size=image_size, limit=limit, seed=seed)
