"""Models for the training script: a small CNN for tiny images, torchvision ResNets for photos."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN", "build_model", "MODELS"]

MODELS = ("cnn", "resnet18", "resnet34", "resnet50")


class SmallCNN(nn.Module):
    """Three conv blocks and a linear head; enough for digits or CIFAR-sized images on a CPU."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of a batch of images ``x``."""
        return self.head(self.features(x))


def build_model(name: str, num_classes: int) -> nn.Module:
    """``cnn`` or a torchvision ResNet (``resnet18/34/50``) with random weights (nothing is downloaded)."""
    if name == "cnn":
        return SmallCNN(num_classes)
    if name in MODELS:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
