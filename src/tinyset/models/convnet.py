"""The ConvNet family of the dataset-distillation literature (Zhao et al.'s ``networks.py``).

Per block: conv3x3 -> norm -> activation -> pooling; a linear classifier on the flattened
features. Default width 128, depth 3, InstanceNorm (= ``GroupNorm(C, C)``), ReLU, average pooling.
Single-channel 28x28 images are treated as 32x32 by padding the first convolution by 3.

``widen`` multiplies the channels from block to block: block ``d`` (0-based) has ``width * widen**d``.
The literature's ConvNet keeps the width constant (``widen=1``); FRePo's ``Conv`` network (Zhou et
al., NeurIPS 2022, ``lib/models/networks.py`` of its code) doubles it (``widen=2``, no
normalisation): 128/256/512 channels and 512 x 4 x 4 = 8192 features at 32x32, against 2048 for the
constant-width ConvNet.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from tinyset.errors import ConfigError
from tinyset.models.base import TinyNet
from tinyset.models.layers import Flatten, Linear, conv_norm, make_activation, make_pool


class ConvNet(TinyNet):
    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int], members: int = 1,
                 width: int = 128, depth: int = 3, norm: str = "instancenorm", act: str = "relu",
                 pooling: str = "avgpooling", name: str = "convnet", widen: int = 1):
        super().__init__(name, channels, num_classes, image_size, members, width=width, depth=depth,
                         norm=norm, act=act, pooling=pooling, **({"widen": widen} if widen != 1 else {}))
        if depth < 1:
            raise ConfigError(f"ConvNet depth must be >= 1, got {depth}")
        if widen < 1:
            raise ConfigError(f"ConvNet widen must be >= 1, got {widen}")
        h, w = image_size
        layers: list[nn.Module] = []
        cin = channels
        for d in range(depth):
            pad = 3 if (d == 0 and channels == 1 and (h, w) == (28, 28)) else 1
            h, w = h + 2 * pad - 2, w + 2 * pad - 2
            cout = width * widen ** d
            layers += conv_norm(cin, cout, 3, pad, norm, (h, w), members)
            layers.append(make_activation(act))
            if pooling != "none":
                if h < 2 or w < 2:
                    raise ConfigError(f"ConvNet depth {depth} pools {image_size[0]}x{image_size[1]} "
                                      f"images below 1x1; use a smaller depth")
                layers.append(make_pool(pooling))
                h, w = h // 2, w // 2
            cin = cout
        layers.append(Flatten(members))
        self.features = nn.Sequential(*layers)
        self.feature_dim = cin * h * w
        self.classifier = Linear(self.feature_dim, num_classes, members)

    def block_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every block's activation output (before its pooling), then the embedding, in one pass.

        Returns ``depth + 1`` tensors: ``[N, M*C_d, H_d, W_d]`` for blocks ``d = 1..depth`` (``C_d``
        channels: ``width`` unless ``widen`` grows it) and,
        last, the flattened features (equal to ``embed(x)``). Methods that match intermediate
        feature maps (DataDAM) use this instead of forward hooks.
        """
        per_block = 3 if self.config["pooling"] == "none" else 4  # conv, norm, activation[, pool]
        last = per_block * self.config["depth"]
        outs: list[torch.Tensor] = []
        h = self._expand(x)
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i < last and i % per_block == 2:
                outs.append(h)
        outs.append(h)
        return outs
