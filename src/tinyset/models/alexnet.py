"""CIFAR-sized AlexNet of the reference code (and AlexNetBN: BatchNorm after every conv)."""
from __future__ import annotations

import torch.nn as nn

from tinyset.errors import ConfigError
from tinyset.models.base import TinyNet
from tinyset.models.layers import Flatten, Linear, conv_norm


class AlexNet(TinyNet):
    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int], members: int = 1,
                 norm: str = "none", name: str = "alexnet"):
        super().__init__(name, channels, num_classes, image_size, members, norm=norm)
        m = members
        pad = 4 if channels == 1 and tuple(image_size) == (28, 28) else 2
        h, w = image_size[0] + 2 * pad - 4, image_size[1] + 2 * pad - 4
        layers: list[nn.Module] = []

        def conv(cin: int, cout: int, k: int, p: int) -> None:
            layers.extend(conv_norm(cin, cout, k, p, norm, (h, w), m))
            layers.append(nn.ReLU())

        conv(channels, 128, 5, pad)
        layers.append(nn.MaxPool2d(2, 2)); h, w = h // 2, w // 2
        conv(128, 192, 5, 2)
        layers.append(nn.MaxPool2d(2, 2)); h, w = h // 2, w // 2
        conv(192, 256, 3, 1)
        conv(256, 192, 3, 1)
        conv(192, 192, 3, 1)
        layers.append(nn.MaxPool2d(2, 2)); h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ConfigError(f"alexnet needs images of at least 8x8; got {image_size}")
        layers.append(Flatten(m))
        self.features = nn.Sequential(*layers)
        self.feature_dim = 192 * h * w
        self.classifier = Linear(self.feature_dim, num_classes, m)
