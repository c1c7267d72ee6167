"""Coreset selection baselines: pick ``ipc`` real images per class (class-balanced, seeded).

Every selector is registered in :data:`SELECTORS` as ``fn(train, ipc, generator, device, **options)
-> LongTensor`` of indices into ``train``; :func:`select` wraps the result as a synthetic-set file.
"""
from __future__ import annotations

import inspect
import time
from typing import Any

import torch

from tinyset.data.base import ImageDataset, check_ipc
from tinyset.registry import Registry
from tinyset.rng import make_generator

SELECTORS: Registry = Registry("selector")


def select(method: str, train: ImageDataset, ipc: int, seed: int = 0, device: str | torch.device = "cpu",
           **options: Any):
    """Run a registered selector and return a :class:`tinyset.synset.SyntheticSet`."""
    from tinyset.synset import SyntheticSet

    fn = SELECTORS.get(method)
    check_ipc(train, ipc)
    start = time.perf_counter()
    idx = fn(train, ipc, make_generator(seed), torch.device(device), **options)
    idx = idx.cpu()
    counts = torch.bincount(train.labels[idx], minlength=train.info.num_classes)
    if not bool((counts == ipc).all()):  # every selector must be class-balanced
        raise RuntimeError(f"selector {method} returned per-class counts {counts.tolist()}, expected {ipc}")
    order = torch.argsort(train.labels[idx], stable=True)
    idx = idx[order]
    # record every option with its effective value (defaults included)
    defaults = {name: p.default for name, p in list(inspect.signature(fn).parameters.items())[4:]
                if p.default is not inspect.Parameter.empty}
    meta = {"method": f"select:{SELECTORS._key(method)}", "config": {"ipc": ipc, **defaults, **options},
            "seed": seed, "iterations": 0, "wall_time_s": time.perf_counter() - start,
            "source_indices": idx.tolist(), "source_split": train.split}
    return SyntheticSet.from_real(train.images[idx], train.labels[idx], train.info, meta=meta)


def per_class_indices(train: ImageDataset) -> list[torch.Tensor]:
    """Indices of every class, in dataset order."""
    return [(train.labels == c).nonzero().flatten() for c in range(train.info.num_classes)]


# register the built-in selectors (each module registers itself)
from tinyset.select import forgetting, herding, kcenter, random  # noqa: E402,F401

__all__ = ["SELECTORS", "select", "per_class_indices"]
