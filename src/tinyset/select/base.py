"""The interface every selector implements: ``fn(train, ipc, generator, device, **options) -> Selection``.

A :class:`Selection` is the chosen indices plus one score per training sample, so that the ranking
behind a selection can be inspected, saved, or reused with another ``ipc`` via :func:`top_per_class`
(the helper for rankers: random draws, forgetting counts, and future ones such as mutual information
or a learned policy).

Every selector declares its options as a typed :class:`SelectorOptions` dataclass (fields made with
:func:`tinyset.hparams.hp`: default, help, range) attached with :func:`with_options`; the values of a
run are resolved through :func:`tinyset.hparams.resolve` (defaults, a recipe, a TOML file, ``--set``,
Python keyword arguments), each value recorded with where it came from. A selector that runs for
many iterations and can be checkpointed also takes ``run=``, a :class:`RunControl`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from tinyset.data.base import ImageDataset
from tinyset.hparams import HParams


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
    #: what an iterative selector wants kept with the set (stored as ``meta["selector_record"]``)
    record: dict[str, Any] = field(default_factory=dict)

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


@dataclass
class SelectorOptions(HParams):
    """Base of every selector's typed options (a selector without options uses it as is)."""


def with_options(cls: type[SelectorOptions]) -> Callable[[Callable[..., Selection]], Callable[..., Selection]]:
    """Decorator: attach the typed options ``cls`` to a selector function (as ``fn.Options``).

    The field names must be the selector's keyword options (checked at registration time)."""

    def attach(fn: Callable[..., Selection]) -> Callable[..., Selection]:
        import inspect

        params = set(list(inspect.signature(fn).parameters)[4:]) - {"run"}
        names = set(cls.specs())
        if params != names:
            raise TypeError(f"{cls.__name__} fields {sorted(names)} do not match the keyword options of "
                            f"{fn.__name__} {sorted(params)}")
        fn.Options = cls  # type: ignore[attr-defined]
        return fn

    return attach


def options_class(fn: Callable[..., Selection]) -> type[SelectorOptions]:
    """The typed options of a selector function (:class:`SelectorOptions` itself when it has none)."""
    return getattr(fn, "Options", SelectorOptions)


@dataclass
class RunControl:
    """How an iterative selector checkpoints (passed as ``run=`` to selectors that accept it).

    ``checkpoint``: the checkpoint file (``None``: no checkpoints); ``resume``: continue from it;
    ``checkpoint_every``: iterations between checkpoints (one is also written after the last
    iteration and when SIGINT/SIGTERM stops the run); ``on_iteration(iteration, total, record)``:
    called after every iteration (progress bars).
    """

    checkpoint: Path | None = None
    resume: bool = False
    checkpoint_every: int = 1
    on_iteration: Callable[[int, int, dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        if self.checkpoint is not None:
            self.checkpoint = Path(self.checkpoint)
        if self.resume and self.checkpoint is None:
            raise ValueError("RunControl: resume needs a checkpoint path")


__all__ = ["Selection", "SelectorOptions", "RunControl", "with_options", "options_class", "per_class_indices",
           "top_per_class"]
