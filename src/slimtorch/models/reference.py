"""The seeds' models, rebuilt exactly, and the demo's digits CNN.

    >>> import torch
    >>> from slimtorch.models import BookCNN, MnistNet
    >>> sum(p.numel() for p in BookCNN().parameters())
    2122186
    >>> MnistNet()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BookCNN", "DigitsCNN", "MnistNet"]


class MnistNet(nn.Module):
    """The NNI quick-start MNIST net. Its forward hard-codes ``x.view(-1, 4 * 4 * 50)``, which a
    compaction that removes conv2 channels must rewrite (NNI's speedup does not, and breaks)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(x, 2, 2)
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2, 2)
        x = x.view(-1, 4 * 4 * 50)
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


class BookCNN(nn.Module):
    """The CIFAR-10 CNN of the book chapter: 2,122,186 parameters; 1,059,306 once both convs lose half
    their filters (the chapter's figures). Inputs are 3x32x32."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.layer2 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc1 = nn.Linear(64 * 8 * 8, 512)
        self.fc2 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(x))
        x = x.reshape(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 8x8 digits (the offline demo): conv-BN-ReLU blocks, one residual
    connection, global pooling and a linear classifier (``in_channels=3`` for colour images)."""

    def __init__(self, width: int = 32, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.block = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
        )
        self.down = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU()
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.block(x))  # residual: stem and block outputs share channels
        x = self.down(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
