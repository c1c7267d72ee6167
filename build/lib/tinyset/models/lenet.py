"""LeNet of the reference code: conv6 k5 -> ReLU -> maxpool -> conv16 k5 -> ReLU -> maxpool -> 120 -> 84."""
from __future__ import annotations

import torch.nn as nn

from tinyset.errors import ConfigError
from tinyset.models.base import TinyNet
from tinyset.models.layers import Conv2d, Flatten, Linear


class LeNet(TinyNet):
    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int], members: int = 1,
                 name: str = "lenet"):
        super().__init__(name, channels, num_classes, image_size, members)
        pad = 2 if channels == 1 else 0
        h = (image_size[0] + 2 * pad - 4) // 2
        h = (h - 4) // 2
        w = (image_size[1] + 2 * pad - 4) // 2
        w = (w - 4) // 2
        if h < 1 or w < 1:
            raise ConfigError(f"lenet needs images of at least 16x16 (1 channel) or 20x20; got "
                              f"{image_size[0]}x{image_size[1]}")
        m = members
        self.features = nn.Sequential(
            Conv2d(channels, 6, 5, padding=pad, members=m), nn.ReLU(), nn.MaxPool2d(2, 2),
            Conv2d(6, 16, 5, members=m), nn.ReLU(), nn.MaxPool2d(2, 2), Flatten(m),
            Linear(16 * h * w, 120, m), nn.ReLU(), Linear(120, 84, m), nn.ReLU())
        self.feature_dim = 84
        self.classifier = Linear(84, num_classes, m)
