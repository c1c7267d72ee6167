"""Coreset selection baselines: pick ``ipc`` real images per class (class-balanced, seeded).

Every selector is registered in :data:`SELECTORS` as ``fn(train, ipc, generator, device, **options)
-> Selection`` (:class:`tinyset.select.base.Selection`: the chosen indices into ``train``, class by
class, and a score for every training sample). :func:`select` runs one and wraps the choice as a
synthetic set inside a :class:`tinyset.results.SelectionResult`.

Built in: ``random`` (uniform scores), ``herding`` and ``k-center`` (one shared greedy loop,
:mod:`tinyset.select.greedy`, on network embeddings), ``forgetting`` (forgetting counts while a
network trains in :func:`tinyset.training.train_ensemble`), ``mi`` (pointwise mutual information
with the label) and ``rl`` (a REINFORCE policy over per-class candidate pools, rewarded by
validation accuracy). Every selector's options are a typed dataclass (``fn.Options``, see
:mod:`tinyset.select.base`); named pipelines of a selector and option values are the recipes of
:mod:`tinyset.select.recipes`.
"""
from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from tinyset.data.base import ImageDataset, check_ipc
from tinyset.errors import ConfigError
from tinyset.hparams import Resolved, check_value, resolve
from tinyset.registry import Registry
from tinyset.results import SelectionResult
from tinyset.rng import make_generator
from tinyset.select.base import (RunControl, Selection, SelectorOptions, options_class, per_class_indices,
                                  top_per_class)

SELECTORS: Registry = Registry("selector")


def selector_options(method: str) -> dict[str, Any]:
    """The options of selector ``method`` with their defaults."""
    return {name: spec.default for name, spec in options_class(SELECTORS.get(method)).specs().items()}


def resolve_options(method: str | None, dataset: str, ipc: int, *, recipe: str | None = None,
                    config_file: str | Path | None = None, sets: Mapping[str, Any] | None = None,
                    options: Mapping[str, Any] | None = None) -> tuple[str, Resolved]:
    """The selector and its typed options for ``(dataset, ipc)``, every value with where it came from.

    Layers (:func:`tinyset.hparams.resolve`), each overriding the ones before: the option defaults;
    ``recipe`` (a :data:`tinyset.select.recipes.RECIPES` entry: its selector and rows, each naming
    its source); ``config_file`` (TOML); ``sets`` (``--set`` text); ``options`` (Python keyword
    arguments, recorded as ``argument NAME``). ``method`` may be None when ``recipe`` names it.
    """
    from tinyset.select.recipes import RECIPES

    table = None
    if recipe is not None:
        rec = RECIPES.get(recipe)
        if method is not None and SELECTORS._key(method) != SELECTORS._key(rec.selector):
            raise ConfigError(f"recipe {RECIPES._key(recipe)} runs the {rec.selector} selector, but the method "
                              f"{method!r} was asked for; give one of them")
        method, table = rec.selector, rec.table(RECIPES._key(recipe))
    if method is None:
        raise ConfigError("no selector: give a method (e.g. --method random) or a recipe (--recipe NAME)")
    key = SELECTORS._key(method)
    cls = options_class(SELECTORS.get(method))
    specs = cls.specs()
    options = dict(options or {})
    bad = [k for k in options if k not in specs]
    if bad:
        raise ConfigError(f"selector {key} has no option{'s' if len(bad) > 1 else ''} {', '.join(bad)}; "
                          f"its options: {', '.join(specs) or 'none'}")
    if ipc < 1:
        raise ConfigError(f"ipc must be >= 1, got {ipc}")
    res = resolve(cls, dataset=dataset, ipc=ipc, profile="paper", table=table, file=config_file, sets=sets)
    if options:
        values = res.values.to_dict()
        for k, v in options.items():
            values[k] = check_value(specs[k], v, f"argument {k}")
            res.sources[k] = f"flag: argument {k}"
        res = Resolved(cls(**values), res.sources)
    return key, res


def select(method: str | None, train: ImageDataset, ipc: int, seed: int = 0, device: str | torch.device = "cpu",
           *, recipe: str | None = None, config_file: str | Path | None = None,
           sets: Mapping[str, Any] | None = None, run: RunControl | None = None, **options: Any) -> SelectionResult:
    """Run a registered selector; returns a :class:`~tinyset.results.SelectionResult`.

    The result holds ``synset`` (the chosen images as a :class:`tinyset.synset.SyntheticSet`, class
    by class, with metadata: method, config, ``config_sources``, seed, ``source_indices``,
    ``source_split``), ``indices`` (the same dataset indices), ``scores`` (``float64 [N]``, one per
    training sample, higher = preferred, ``-inf`` = never reached), ``seconds`` and ``config``
    (``ipc``, every option with its effective value, ``recipe`` when one was used, and ``sources``:
    where every option's value came from, see :func:`resolve_options`). Unknown options raise
    :class:`~tinyset.errors.ConfigError`. ``run`` (checkpoints, resume, progress) is passed to
    selectors that take it; others refuse a checkpoint.
    """
    from tinyset.synset import SyntheticSet

    key, resolved = resolve_options(method, train.info.name, ipc, recipe=recipe, config_file=config_file,
                                    sets=sets, options=options)
    fn = SELECTORS.get(key)
    check_ipc(train, ipc)
    extra: dict[str, Any] = {}
    if "run" in inspect.signature(fn).parameters:
        extra["run"] = run
    elif run is not None and run.checkpoint is not None:
        raise ConfigError(f"selector {key} runs in one pass and writes no checkpoint; a checkpoint (or "
                          f"--resume) applies to iterative selectors only")
    values = resolved.values.to_dict()
    start = time.perf_counter()
    sel = fn(train, ipc, make_generator(seed), torch.device(device), **values, **extra)
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
    config: dict[str, Any] = {"ipc": ipc, **values}
    if recipe is not None:
        from tinyset.select.recipes import RECIPES

        config["recipe"] = RECIPES._key(recipe)
    config["sources"] = dict(resolved.sources)
    seconds = time.perf_counter() - start
    meta = {"method": f"select:{key}", "config": config, "config_sources": dict(resolved.sources), "seed": seed,
            "iterations": int(sel.record.get("iterations", 0)), "wall_time_s": seconds,
            "source_indices": idx.tolist(), "source_split": train.split}
    if sel.record:
        meta["selector_record"] = sel.record
    synset = SyntheticSet.from_real(train.images[idx], train.labels[idx], train.info, meta=meta)
    return SelectionResult(method=key, dataset=train.info.name, ipc=ipc, seed=seed, indices=idx.tolist(),
                           seconds=seconds, config=dict(config), scores=sel.scores, synset=synset)


def ipc_from_size(size: int, num_classes: int, dataset: str = "the dataset") -> int:
    """The images per class of a class-balanced total budget ``size`` (``--size``); a ConfigError
    unless ``size`` is a positive multiple of ``num_classes``."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"--size {size!r}: expected a positive integer (the total number of images)")
    if size % num_classes:
        lo = max(num_classes, size - size % num_classes)
        raise ConfigError(f"--size {size} cannot be split evenly over the {num_classes} classes of {dataset}: "
                          f"expected a multiple of {num_classes} (e.g. {lo} = {lo // num_classes} per class, "
                          f"or {lo + num_classes} = {lo // num_classes + 1} per class)")
    return size // num_classes


# register the built-in selectors (each module registers itself)
from tinyset.select import el2n, forgetting, herding, kcenter, mi, random, rl  # noqa: E402,F401

__all__ = ["SELECTORS", "Selection", "SelectorOptions", "RunControl", "select", "selector_options",
           "resolve_options", "ipc_from_size", "per_class_indices", "top_per_class"]
