"""VGG11 of the reference code: InstanceNorm (GroupNorm(C, C)) by default, VGG11-BN with BatchNorm."""
from __future__ import annotations

import torch.nn as nn

from tinyset.errors import ConfigError
from tinyset.models.base import TinyNet
from tinyset.models.layers import Flatten, Linear, conv_norm

VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(TinyNet):
    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int], members: int = 1,
                 norm: str = "instancenorm", cfg: tuple = VGG11_CFG, name: str = "vgg11"):
        super().__init__(name, channels, num_classes, image_size, members, norm=norm)
        m = members
        h, w = image_size
        layers: list[nn.Module] = []
        cin = channels
        for i, v in enumerate(cfg):
            if v == "M":
                if h < 2 or w < 2:
                    raise ConfigError(f"{name} pools {image_size[0]}x{image_size[1]} images below "
                                      f"1x1; it needs at least 28x28")
                layers.append(nn.MaxPool2d(2, 2))
                h, w = h // 2, w // 2
                continue
            pad = 3 if (i == 0 and channels == 1 and (h, w) == (28, 28)) else 1
            h, w = h + 2 * pad - 2, w + 2 * pad - 2
            layers += conv_norm(cin, int(v), 3, pad, norm, (h, w), m) + [nn.ReLU()]
            cin = int(v)
        layers.append(Flatten(m))
        self.features = nn.Sequential(*layers)
        self.feature_dim = cin * h * w
        self.classifier = Linear(self.feature_dim, num_classes, m)
