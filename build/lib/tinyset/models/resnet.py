"""ResNet18 of the reference code: BasicBlocks [2, 2, 2, 2], 3x3 stem with stride 1.

The default norm is InstanceNorm (GroupNorm(C, C)); ResNet18-BN uses BatchNorm. Features are
globally average-pooled (the reference's ``avg_pool2d(4)`` on its 4x4 final map; adaptive here so
8x8 inputs work too).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyset.models.base import TinyNet
from tinyset.models.layers import Conv2d, Flatten, Linear, make_norm


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str, hw: tuple[int, int], members: int):
        super().__init__()
        m = members
        self.conv1 = Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False, members=m)
        self.bn1 = make_norm(norm, cout, hw, m)
        self.conv2 = Conv2d(cout, cout, 3, padding=1, bias=False, members=m)
        self.bn2 = make_norm(norm, cout, hw, m)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(Conv2d(cin, cout, 1, stride=stride, bias=False, members=m),
                                          make_norm(norm, cout, hw, m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class GlobalAvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, 1)


class ResNet(TinyNet):
    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int], members: int = 1,
                 norm: str = "instancenorm", blocks: tuple = (2, 2, 2, 2), name: str = "resnet18"):
        super().__init__(name, channels, num_classes, image_size, members, norm=norm)
        m = members
        h, w = image_size
        layers: list[nn.Module] = [Conv2d(channels, 64, 3, padding=1, bias=False, members=m),
                                   make_norm(norm, 64, (h, w), m), nn.ReLU()]
        cin = 64
        for i, (cout, n) in enumerate(zip((64, 128, 256, 512), blocks)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                if stride == 2:
                    h, w = (h + 1) // 2, (w + 1) // 2
                layers.append(BasicBlock(cin, cout, stride, norm, (h, w), m))
                cin = cout
        layers += [GlobalAvgPool(), Flatten(m)]
        self.features = nn.Sequential(*layers)
        self.feature_dim = 512
        self.classifier = Linear(512, num_classes, m)
