"""Random selection: ``ipc`` uniformly drawn images of every class."""
from __future__ import annotations

import torch

from tinyset.data.base import ImageDataset
from tinyset.select import SELECTORS, per_class_indices


@SELECTORS.register("random", help="ipc uniformly random real images per class")
def random_select(train: ImageDataset, ipc: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    picks = []
    for idx in per_class_indices(train):
        picks.append(idx[torch.randperm(idx.numel(), generator=generator)[:ipc]])
    return torch.cat(picks)
