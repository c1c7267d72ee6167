"""Base class of every tinyset network: ``embed`` (features) + ``classifier``, ``members`` wide."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from tinyset.errors import ConfigError


class TinyNet(nn.Module):
    """A classifier split into ``embed(x)`` (features before the classifier) and ``classifier``.

    Inputs are ``[N, C, H, W]``; with ``members > 1`` they may also be ``[N, M*C, H, W]`` (a
    different batch per member, member ``m`` in channels ``m*C:(m+1)*C``); a ``[N, C, H, W]`` batch
    is then shown to every member. Outputs are ``[N, K]`` for one member, ``[N, M, K]`` otherwise.
    """

    def __init__(self, name: str, channels: int, num_classes: int, image_size: tuple[int, int],
                 members: int, **config: Any):
        super().__init__()
        self.name = name
        self.channels = channels
        self.num_classes = num_classes
        self.image_size = tuple(image_size)
        self.members = members
        self.config = dict(config)
        self.features: nn.Module = nn.Identity()
        self.classifier: nn.Module = nn.Identity()

    def spec(self) -> dict[str, Any]:
        """Everything needed to build the same architecture again (see ``create_model``)."""
        return {"name": self.name, "channels": self.channels, "num_classes": self.num_classes,
                "image_size": list(self.image_size), **self.config}

    def _expand(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ConfigError(f"{self.name} expects images [N, C, H, W], got shape {tuple(x.shape)}")
        c = x.shape[1]
        if c == self.channels * self.members:
            return x
        if c == self.channels:
            return x.repeat(1, self.members, 1, 1) if self.members > 1 else x
        raise ConfigError(f"{self.name} expects {self.channels} channels (or {self.channels}x"
                          f"{self.members} for {self.members} members), got {c}")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self._expand(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
