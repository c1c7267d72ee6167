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

from tinyset.select import SELECTORS, greedy
from tinyset.select._embed import embedding_selector


class HerdingCriterion:
    """Herding as a greedy criterion: the gain of row ``i`` at step ``t`` is ``-||e_i - a||^2 + ||a||^2``.

    At step ``t`` (``t`` rows chosen, their sum ``s``) the row ``i`` minimising
    ``||(s + e_i) / (t + 1) - mu||`` is added, i.e. minimising ``||e_i - a||^2`` with
    ``a = (t + 1) mu - s``. That is evaluated for every candidate at once as
    ``||e_i||^2 - 2 e_i . a`` (float64); the gain is its negation. ``mu`` is the mean of the rows
    themselves unless a target mean is given (the GAN's ``herding`` filter matches the mean of real
    images with generated candidates).
    """

    def __init__(self, e: torch.Tensor, mu: torch.Tensor | None = None):
        self.e = e
        self.mu = e.mean(dim=0) if mu is None else mu.to(e)
        self.sq = e.pow(2).sum(dim=1)  # [n]
        self.total = torch.zeros_like(self.mu)

    def gains(self, t: int) -> torch.Tensor:
        target = (t + 1) * self.mu - self.total
        return -(self.sq - 2.0 * (self.e @ target))

    def add(self, i: int) -> None:
        self.total += self.e[i]


def herding_order(emb: torch.Tensor, k: int, mu: torch.Tensor | None = None) -> torch.Tensor:
    """Positions ``int64 [k]`` of the rows of ``emb [n, D]`` chosen by herding, in order, towards
    ``mu [D]`` (default: the rows' own mean).

    :func:`tinyset.select.greedy.greedy_order` with :class:`HerdingCriterion`: chosen rows are
    excluded; ties go to the lowest position.
    """
    if mu is not None and tuple(mu.shape) != (emb.shape[-1],):
        raise ValueError(f"herding_order: the target mean has shape {tuple(mu.shape)}, expected ({emb.shape[-1]},)")
    criterion = HerdingCriterion if mu is None else (lambda e: HerdingCriterion(e, mu))
    return greedy.greedy_order(emb, k, criterion, name="herding_order")


herding_select = SELECTORS.register(
    "herding",
    embedding_selector(HerdingCriterion, "herding",
                       "Herding on the embeddings of ``model`` (random init unless ``pretrain_epochs > 0``)."),
    help="per class, greedy running-mean matching of ConvNet embeddings (Welling 2009)",
)


__all__ = ["HerdingCriterion", "herding_order", "herding_select"]
