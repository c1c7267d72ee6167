"""The library in five calls, for Python users (the command line is a thin layer over the same calls).

    from tinyset.api import distill, select, evaluate, baseline, load_dataset

    train = load_dataset("mnist", "train", root="data")
    test = load_dataset("mnist", "test", root="data")
    run = distill("dm", train, ipc=10, out_dir="runs/dm10", preset="cpu", sets={"iterations": 200})
    res = evaluate(run.synset, test, models=["convnet", "mlp"], protocol="dsa")
    print(res.score("convnet").mean, res.to_dict()["schema"])

Every call takes plain arguments (datasets, names, numbers, paths) and returns a typed result from
:mod:`tinyset.results` (``DistillationResult``, ``SelectionResult``, ``EvaluationResult``,
``SamplingResult``), whose ``to_dict()`` is the JSON the command line writes. :func:`sample` draws a
set from the generator file of a ``gan`` run.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from tinyset.data import load_dataset
from tinyset.evaluate import Protocol, evaluate_full, evaluate_synset
from tinyset.methods.loop import distill
from tinyset.results import DistillationResult, EvaluationResult, SamplingResult, SelectionResult
from tinyset.select import select
from tinyset.synset import SyntheticSet


def _protocol(protocol: str | Protocol | None, default: str, overrides: dict[str, Any]) -> Protocol:
    if isinstance(protocol, Protocol):
        return protocol.with_overrides(**overrides)
    return Protocol.preset(protocol or default, **overrides)


def evaluate(synset: SyntheticSet | str | os.PathLike, test: Any, models: Sequence[str] = ("convnet",),
             protocol: str | Protocol | None = None, seed: int = 0, device: str | torch.device = "cpu",
             train: Any = None, split: str = "test", **protocol_overrides: Any) -> EvaluationResult:
    """Train fresh networks on a synthetic set (or its ``.safetensors`` file) and test them on ``test``
    (a dataset, or a dataset name read from ``$TINYSET_DATA``). ``protocol`` is a preset name (default
    ``dsa``) or a :class:`Protocol`; keyword arguments override its fields (``epochs=300``, ...).
    ``train``: the real training split (or its dataset name), needed by a protocol that stops early
    (``dsa-early``, ``early_stop_patience=``): its validation split is held out of it; and by
    ``split="validation"``, which scores on images held out of it instead of ``test`` (may be None)."""
    if not isinstance(synset, SyntheticSet):
        synset = SyntheticSet.load(synset)
    if isinstance(test, str):
        test = load_dataset(test, "test")
    if isinstance(train, str):
        train = load_dataset(train, "train")
    return evaluate_synset(synset, test, list(models), _protocol(protocol, "dsa", protocol_overrides), seed=seed,
                           device=device, train=train, split=split)


def baseline(train: Any, test: Any, models: Sequence[str] = ("convnet",), protocol: str | Protocol | None = None,
             seed: int = 0, device: str | torch.device = "cpu", **protocol_overrides: Any) -> EvaluationResult:
    """The same networks trained on the whole training set (protocol default ``fulldata``)."""
    return evaluate_full(train, test, list(models), _protocol(protocol, "fulldata", protocol_overrides), seed=seed,
                         device=device)


def sample(generator: str | os.PathLike, ipc: int, *, filter: str = "none", candidates: int = 4,
           sample_seed: int | None = None, filter_seed: int | None = None, train: Any = None,
           device: str | torch.device = "cpu", precision: str = "fp32", **filter_options: Any) -> SamplingResult:
    """``ipc`` samples per class from a ``gan`` run's generator file (``RUN/generator.safetensors``),
    optionally the best of ``candidates`` per image by ``filter`` (``none``, ``discriminator``,
    ``classifier``, ``herding`` or ``mi``; the last three need ``train``, the training split of the
    file's dataset). ``filter_options``: ``model``, ``epochs``, ``per_class`` (classifier and
    herding) and ``estimator`` (mi) of
    :class:`tinyset.methods.gan.FilterSettings`. The set is ``result.synset``."""
    from tinyset.methods.gan import FilterSettings, sample_generator

    filtering = FilterSettings(filter, candidates, seed=filter_seed, **filter_options)
    synset = sample_generator(generator, ipc, sample_seed=sample_seed, filtering=filtering, train=train,
                              device=device, precision=precision)
    return SamplingResult(str(generator), synset.info.name, ipc, synset.meta["seconds"], synset.meta["gan"],
                          synset=synset)


__all__ = ["distill", "select", "evaluate", "baseline", "sample", "load_dataset", "DistillationResult",
           "SelectionResult", "EvaluationResult", "SamplingResult", "Protocol", "SyntheticSet"]
