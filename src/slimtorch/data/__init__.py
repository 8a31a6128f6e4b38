"""Data loaders for the demo (scikit-learn's digits, always offline) and for local ``.npz`` datasets."""

from slimtorch.data.datasets import TensorSplit, load_cifar10, load_digits, load_mnist

__all__ = ["TensorSplit", "load_cifar10", "load_digits", "load_mnist"]
