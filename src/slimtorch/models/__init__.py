"""Small reference models used by the demo, the benchmarks and the seed experiments."""

from slimtorch.models.reference import BookCNN, DigitsCNN, MnistNet

__all__ = ["BookCNN", "DigitsCNN", "MnistNet"]
