"""K-center greedy selection, per class, in embedding space.

The greedy 2-approximation of the k-center problem used as a core-set by Sener & Savarese
("Active Learning for Convolutional Neural Networks: A Core-Set Approach", ICLR 2018) and as a
coreset baseline in DeepCore (Guo et al., DEXA 2022): repeatedly add the point farthest (L2) from
its nearest chosen center, so the chosen points cover the class with the smallest radius.

Sener & Savarese start from an already labelled pool and DeepCore from a random point; with no
pool here, the first center is the sample closest to the class mean, which makes the algorithm
deterministic (ties go to the lowest index). Embeddings come from
:func:`tinyset.select._embed.embed_dataset` (by default a randomly initialised ConvNet); the
generator only seeds that network.
"""
from __future__ import annotations

import torch

from tinyset.select import SELECTORS, greedy
from tinyset.select._embed import embedding_selector


def _sq_dist_to(e: torch.Tensor, sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances ``[n]`` of the rows of ``e`` (squared norms ``sq``) to the point ``c``."""
    return (sq - 2.0 * (e @ c) + c.dot(c)).clamp_min_(0.0)


class KCenterCriterion:
    """K-center greedy as a greedy criterion.

    Step 0: the gain is minus the distance to the mean (the row closest to the mean first). Later
    steps: the distance to the nearest chosen center, kept up to date incrementally (one ``[n]``
    distance vector per pick: O(n D k) time, O(n) extra memory), in float64.
    """

    def __init__(self, e: torch.Tensor):
        self.e = e
        self.sq = e.pow(2).sum(dim=1)
        self.min_d: torch.Tensor | None = None

    def gains(self, t: int) -> torch.Tensor:
        if self.min_d is None:
            return -_sq_dist_to(self.e, self.sq, self.e.mean(dim=0))
        return self.min_d

    def add(self, i: int) -> None:
        d = _sq_dist_to(self.e, self.sq, self.e[i])
        self.min_d = d if self.min_d is None else torch.minimum(self.min_d, d)


def kcenter_order(emb: torch.Tensor, k: int) -> torch.Tensor:
    """Positions ``int64 [k]`` of the rows of ``emb [n, D]`` chosen by k-center greedy, in order.

    First the row closest to the mean, then repeatedly the row with the largest distance to its
    nearest chosen center (:func:`tinyset.select.greedy.greedy_order` with
    :class:`KCenterCriterion`). Chosen rows are never picked again; ties go to the lowest position.
    """
    return greedy.greedy_order(emb, k, KCenterCriterion, name="kcenter_order")


kcenter_select = SELECTORS.register(
    "k-center",
    embedding_selector(KCenterCriterion, "k-center",
                       "K-center greedy on the embeddings of ``model`` (random init unless ``pretrain_epochs > 0``)."),
    help="per class, k-center greedy on ConvNet embeddings (Sener & Savarese 2018)",
)


__all__ = ["KCenterCriterion", "kcenter_order", "kcenter_select"]
