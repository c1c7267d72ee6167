"""The interface every selector implements: ``fn(train, ipc, generator, device, **options) -> Selection``.

A :class:`Selection` is the chosen indices plus one score per training sample, so that the ranking
behind a selection can be inspected, saved, or reused with another ``ipc`` via :func:`top_per_class`
(the helper for rankers: random draws, forgetting counts, and future ones such as mutual information
or a learned policy).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tinyset.data.base import ImageDataset


@dataclass
class Selection:
    """What a selector returns.

    ``indices``: ``int64`` dataset indices of the chosen samples, class by class (class 0 first),
    each class in the selector's order of preference (best first).
    ``scores``: ``float64 [N]``, one per training sample, higher = preferred by the selector;
    ``-inf`` for samples the method never reached (greedy methods score their picks
    ``0, -1, -2, ...`` by pick step and everything else ``-inf``; forgetting leaves samples
    outside its training subsample at ``-inf``).
    ``order_note``: what the scores are, in words (shown in docs and results).
    """

    indices: torch.Tensor
    scores: torch.Tensor
    order_note: str = ""

    def __post_init__(self) -> None:
        self.indices = torch.as_tensor(self.indices).detach().to("cpu", torch.long).reshape(-1)
        self.scores = torch.as_tensor(self.scores).detach().to("cpu", torch.float64).reshape(-1)


def per_class_indices(train: ImageDataset) -> list[torch.Tensor]:
    """Indices of every class, in dataset order."""
    return [(train.labels == c).nonzero().flatten() for c in range(train.info.num_classes)]


def top_per_class(scores: torch.Tensor, labels: torch.Tensor, ipc: int, num_classes: int | None = None) -> torch.Tensor:
    """The ``ipc`` highest-scoring samples of every class: ``int64`` indices, class by class.

    Within a class the indices are in descending score order; ties go to the lowest index.
    ``num_classes`` defaults to ``labels.max() + 1``. Raises ``ValueError`` for mismatched shapes,
    NaN scores, or a class with fewer than ``ipc`` samples scored above ``-inf`` (a sample a method
    never reached is never picked).
    """
    scores = torch.as_tensor(scores)
    labels = torch.as_tensor(labels)
    if scores.dim() != 1 or labels.dim() != 1 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"top_per_class needs scores [N] and labels [N], got {tuple(scores.shape)} and "
                         f"{tuple(labels.shape)}")
    if bool(torch.isnan(scores).any()):
        raise ValueError("top_per_class: scores contain NaN")
    if ipc < 0:
        raise ValueError(f"top_per_class: ipc must be >= 0, got {ipc}")
    scores, labels = scores.cpu(), labels.cpu()
    k = int(labels.max()) + 1 if num_classes is None else num_classes
    picks = []
    for c in range(k):
        idx = (labels == c).nonzero().flatten()
        reachable = int((scores[idx] > float("-inf")).sum())
        if reachable < ipc:
            raise ValueError(f"top_per_class: class {c} has {reachable} samples with a score above -inf, "
                             f"cannot pick {ipc}")
        order = torch.sort(scores[idx], descending=True, stable=True).indices[:ipc]
        picks.append(idx[order])
    return torch.cat(picks) if picks else torch.empty(0, dtype=torch.long)


__all__ = ["Selection", "per_class_indices", "top_per_class"]
