"""Herding selection: per class, greedily match the mean embedding.

Herding (Welling, "Herding Dynamical Weights to Learn", ICML 2009) as used for exemplar selection
by iCaRL (Rebuffi et al., CVPR 2017) and as a coreset baseline in dataset distillation (Zhao et
al., "Dataset Condensation with Gradient Matching", ICLR 2021) and DeepCore (Guo et al., DEXA
2022): starting from the class mean ``mu`` of the embeddings, repeatedly add the not-yet-chosen
sample whose addition brings the running mean of the chosen embeddings closest (L2) to ``mu``.

Embeddings come from :func:`tinyset.select._embed.embed_dataset` (by default a randomly
initialised ConvNet). The algorithm itself is deterministic (ties go to the lowest index); the
generator only seeds the network.
"""
from __future__ import annotations

import torch

from tinyset.select import SELECTORS
from tinyset.select._embed import embedding_selector


def herding_order(emb: torch.Tensor, k: int) -> torch.Tensor:
    """Positions ``int64 [k]`` of the rows of ``emb [n, D]`` chosen by herding, in order.

    At step ``t`` (``t`` rows chosen, their sum ``s``) the row ``i`` minimising
    ``||(s + e_i) / (t + 1) - mu||`` is added, i.e. minimising ``||e_i - ((t + 1) mu - s)||^2``.
    That is evaluated for every candidate at once as ``||e_i||^2 - 2 e_i . a`` (float64,
    ``a = (t + 1) mu - s``); chosen rows are excluded; ties go to the lowest position.
    """
    if emb.dim() != 2:
        raise ValueError(f"herding_order expects embeddings [n, D], got shape {tuple(emb.shape)}")
    n = emb.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"cannot pick {k} of {n} rows")
    e = emb.to(torch.float64)
    mu = e.mean(dim=0)
    sq = e.pow(2).sum(dim=1)  # [n]
    chosen = torch.zeros(n, dtype=torch.bool, device=e.device)
    total = torch.zeros_like(mu)
    order = torch.empty(k, dtype=torch.long, device=e.device)
    for t in range(k):
        target = (t + 1) * mu - total
        score = sq - 2.0 * (e @ target)
        score[chosen] = float("inf")
        i = torch.argmin(score)  # first minimum: lowest position on ties
        order[t] = i
        chosen[i] = True
        total += e[i]
    return order


herding_select = SELECTORS.register(
    "herding",
    embedding_selector(herding_order, "Herding on the embeddings of ``model`` (random init unless ``pretrain_epochs > 0``)."),
    help="per class, greedy running-mean matching of ConvNet embeddings (Welling 2009)",
)


__all__ = ["herding_order", "herding_select"]
