"""Random selection: ``ipc`` uniformly drawn images of every class.

Every sample gets a uniform random score (``float64`` in [0, 1), drawn from the seeded generator);
the ``ipc`` highest scores of each class are chosen, which is a uniform draw without replacement.
"""
from __future__ import annotations

import torch

from tinyset.data.base import ImageDataset
from tinyset.select import SELECTORS
from tinyset.select.base import Selection, top_per_class


@SELECTORS.register("random", help="ipc uniformly random real images per class")
def random_select(train: ImageDataset, ipc: int, generator: torch.Generator, device: torch.device) -> Selection:
    scores = torch.rand(len(train), generator=generator, dtype=torch.float64)
    return Selection(top_per_class(scores, train.labels, ipc, train.info.num_classes), scores,
                     order_note="random: uniform draws in [0, 1); the ipc highest per class are chosen")
