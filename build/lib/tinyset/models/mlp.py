"""MLP of the reference code: input -> 128 -> 128 -> classes, ReLU."""
from __future__ import annotations

import torch.nn as nn

from tinyset.models.base import TinyNet
from tinyset.models.layers import Flatten, Linear


class MLP(TinyNet):
    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int], members: int = 1,
                 hidden: int = 128, name: str = "mlp"):
        super().__init__(name, channels, num_classes, image_size, members, hidden=hidden)
        d = channels * image_size[0] * image_size[1]
        self.features = nn.Sequential(Flatten(members), Linear(d, hidden, members), nn.ReLU(),
                                      Linear(hidden, hidden, members), nn.ReLU())
        self.feature_dim = hidden
        self.classifier = Linear(hidden, num_classes, members)
