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

from tinyset.select import SELECTORS
from tinyset.select._embed import embedding_selector


def _sq_dist_to(e: torch.Tensor, sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances ``[n]`` of the rows of ``e`` (squared norms ``sq``) to the point ``c``."""
    return (sq - 2.0 * (e @ c) + c.dot(c)).clamp_min_(0.0)


def kcenter_order(emb: torch.Tensor, k: int) -> torch.Tensor:
    """Positions ``int64 [k]`` of the rows of ``emb [n, D]`` chosen by k-center greedy, in order.

    First the row closest to the mean, then repeatedly the row with the largest distance to its
    nearest chosen center. The nearest-center distances are kept up to date incrementally (one
    ``[n]`` distance vector per step: O(n D k) time, O(n) extra memory), in float64. Chosen rows
    are never picked again; ties go to the lowest position.
    """
    if emb.dim() != 2:
        raise ValueError(f"kcenter_order expects embeddings [n, D], got shape {tuple(emb.shape)}")
    n = emb.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"cannot pick {k} of {n} rows")
    order = torch.empty(k, dtype=torch.long, device=emb.device)
    if k == 0:
        return order
    e = emb.to(torch.float64)
    sq = e.pow(2).sum(dim=1)
    first = torch.argmin(_sq_dist_to(e, sq, e.mean(dim=0)))
    order[0] = first
    min_d = _sq_dist_to(e, sq, e[first])
    min_d[first] = -1.0  # chosen: below any distance
    for t in range(1, k):
        i = torch.argmax(min_d)  # first maximum: lowest position on ties
        order[t] = i
        min_d = torch.minimum(min_d, _sq_dist_to(e, sq, e[i]))
        min_d[i] = -1.0
    return order


kcenter_select = SELECTORS.register(
    "k-center",
    embedding_selector(kcenter_order, "K-center greedy on the embeddings of ``model`` (random init unless ``pretrain_epochs > 0``)."),
    help="per class, k-center greedy on ConvNet embeddings (Sener & Savarese 2018)",
)


__all__ = ["kcenter_order", "kcenter_select"]
