"""Coreset selection baselines: pick ``ipc`` real images per class (class-balanced, seeded).

Every selector is registered in :data:`SELECTORS` as ``fn(train, ipc, generator, device, **options)
-> LongTensor`` of indices into ``train``; :func:`select` wraps the result as a synthetic-set file.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from tinyset import __version__
from tinyset.data.base import ImageDataset, check_ipc
from tinyset.registry import Registry
from tinyset.utils import make_generator

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
    meta = {"method": f"select:{SELECTORS._key(method)}", "config": {"ipc": ipc, **options},
            "seed": seed, "iterations": 0, "wall_time_s": time.perf_counter() - start,
            "source_indices": idx.tolist(), "source_split": train.split}
    return SyntheticSet.from_real(train.images[idx], train.labels[idx], train.info, meta=meta)


def per_class_indices(train: ImageDataset) -> list[torch.Tensor]:
    """Indices of every class, in dataset order."""
    return [(train.labels == c).nonzero().flatten() for c in range(train.info.num_classes)]


# register the built-in selectors
from tinyset.select import random as _random  # noqa: E402,F401

for _mod in ("herding", "kcenter", "forgetting"):
    try:
        __import__(f"tinyset.select.{_mod}")
    except ModuleNotFoundError as _exc:  # pragma: no cover - module being written
        if _exc.name != f"tinyset.select.{_mod}":
            raise

__all__ = ["SELECTORS", "select", "per_class_indices"]
