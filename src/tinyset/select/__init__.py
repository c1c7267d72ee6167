"""Coreset selection baselines: pick ``ipc`` real images per class (class-balanced, seeded).

Every selector is registered in :data:`SELECTORS` as ``fn(train, ipc, generator, device, **options)
-> Selection`` (:class:`tinyset.select.base.Selection`: the chosen indices into ``train``, class by
class, and a score for every training sample). :func:`select` runs one and wraps the choice as a
synthetic set inside a :class:`tinyset.results.SelectionResult`.

Built in: ``random`` (uniform scores), ``herding`` and ``k-center`` (one shared greedy loop,
:mod:`tinyset.select.greedy`, on network embeddings) and ``forgetting`` (forgetting counts while a
network trains in :func:`tinyset.training.train_ensemble`).
"""
from __future__ import annotations

import inspect
import time
from typing import Any

import torch

from tinyset.data.base import ImageDataset, check_ipc
from tinyset.errors import ConfigError
from tinyset.registry import Registry
from tinyset.results import SelectionResult
from tinyset.rng import make_generator
from tinyset.select.base import Selection, per_class_indices, top_per_class

SELECTORS: Registry = Registry("selector")


def selector_options(method: str) -> dict[str, Any]:
    """The options of selector ``method`` with their defaults."""
    fn = SELECTORS.get(method)
    return {name: p.default for name, p in list(inspect.signature(fn).parameters.items())[4:]
            if p.default is not inspect.Parameter.empty}


def select(method: str, train: ImageDataset, ipc: int, seed: int = 0, device: str | torch.device = "cpu",
           **options: Any) -> SelectionResult:
    """Run a registered selector; returns a :class:`~tinyset.results.SelectionResult`.

    The result holds ``synset`` (the chosen images as a :class:`tinyset.synset.SyntheticSet`, class
    by class, with metadata: method, config, seed, ``source_indices``, ``source_split``),
    ``indices`` (the same dataset indices), ``scores`` (``float64 [N]``, one per training sample,
    higher = preferred, ``-inf`` = never reached), ``seconds`` and ``config`` (``ipc`` and every
    option with its effective value). Unknown options raise :class:`~tinyset.errors.ConfigError`.
    """
    from tinyset.synset import SyntheticSet

    fn = SELECTORS.get(method)
    key = SELECTORS._key(method)
    defaults = selector_options(method)
    bad = [k for k in options if k not in defaults]
    if bad:
        raise ConfigError(f"selector {key} has no option{'s' if len(bad) > 1 else ''} {', '.join(bad)}; "
                          f"its options: {', '.join(defaults) or 'none'}")
    check_ipc(train, ipc)
    start = time.perf_counter()
    sel = fn(train, ipc, make_generator(seed), torch.device(device), **options)
    if not isinstance(sel, Selection):
        raise TypeError(f"selector {key} returned {type(sel).__name__}, expected a Selection")
    if sel.scores.shape != (len(train),):
        raise RuntimeError(f"selector {key} returned scores of shape {tuple(sel.scores.shape)}, "
                           f"expected ({len(train)},)")
    idx = sel.indices
    counts = torch.bincount(train.labels[idx], minlength=train.info.num_classes)
    if not bool((counts == ipc).all()) or idx.unique().numel() != idx.numel():
        raise RuntimeError(f"selector {key} returned per-class counts {counts.tolist()} "
                           f"({idx.numel() - idx.unique().numel()} repeated), expected {ipc} distinct per class")
    idx = idx[torch.argsort(train.labels[idx], stable=True)]
    config = {"ipc": ipc, **defaults, **options}
    seconds = time.perf_counter() - start
    meta = {"method": f"select:{key}", "config": config, "seed": seed, "iterations": 0,
            "wall_time_s": seconds, "source_indices": idx.tolist(), "source_split": train.split}
    synset = SyntheticSet.from_real(train.images[idx], train.labels[idx], train.info, meta=meta)
    return SelectionResult(method=key, dataset=train.info.name, ipc=ipc, seed=seed, indices=idx.tolist(),
                           seconds=seconds, config=dict(config), scores=sel.scores, synset=synset)


# register the built-in selectors (each module registers itself)
from tinyset.select import forgetting, herding, kcenter, mi, random  # noqa: E402,F401

__all__ = ["SELECTORS", "Selection", "select", "selector_options", "per_class_indices", "top_per_class"]
