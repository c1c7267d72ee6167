"""The one greedy loop of the embedding selectors (herding, k-center).

:func:`greedy_order` picks ``k`` rows of an embedding matrix one at a time. What "best" means is a
small criterion object built from the (float64) embeddings:

* ``gains(t) -> float64 [n]``: how good every row is as the pick of step ``t`` (higher = better);
* ``add(i)``: row ``i`` was picked (update the running state).

The loop excludes rows already picked and takes the first maximum (ties go to the lowest
position), so both selectors are deterministic given the embeddings.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch


class GreedyCriterion(Protocol):
    def gains(self, t: int) -> torch.Tensor: ...

    def add(self, i: int) -> None: ...


#: builds a criterion from the float64 embeddings ``[n, D]``
CriterionFactory = Callable[[torch.Tensor], GreedyCriterion]


def greedy_order(emb: torch.Tensor, k: int, criterion: CriterionFactory, name: str = "greedy_order",
                 on_pick: Callable[[int], None] | None = None) -> torch.Tensor:
    """Positions ``int64 [k]`` of the rows of ``emb [n, D]`` picked greedily by ``criterion``, in order.

    ``on_pick(t)`` is called after every pick (progress bars). ``name`` appears in error messages.
    """
    if emb.dim() != 2:
        raise ValueError(f"{name} expects embeddings [n, D], got shape {tuple(emb.shape)}")
    n = emb.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"{name}: cannot pick {k} of {n} rows")
    order = torch.empty(k, dtype=torch.long, device=emb.device)
    if k == 0:
        return order
    crit = criterion(emb.to(torch.float64))
    chosen = torch.zeros(n, dtype=torch.bool, device=emb.device)
    for t in range(k):
        gains = crit.gains(t).masked_fill(chosen, float("-inf"))
        i = torch.argmax(gains)  # first maximum: lowest position on ties
        order[t] = i
        chosen[i] = True
        crit.add(int(i))
        if on_pick is not None:
            on_pick(t)
    return order


def pick_scores(k: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The scores of ``k`` greedy picks: ``0, -1, ..., -(k-1)`` (the earlier, the better)."""
    return torch.arange(0, -k, -1, dtype=dtype)


__all__ = ["GreedyCriterion", "CriterionFactory", "greedy_order", "pick_scores"]
