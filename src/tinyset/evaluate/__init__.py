"""Evaluation: train fresh networks on a set and report real test accuracy (mean ± std).

The protocol (``Protocol``) is recorded with every result. Nothing here looks at the test set
except to report the final accuracy of every trained model.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import torch

from tinyset.augment import DSA, default_strategy
from tinyset.data.base import DatasetInfo, ImageDataset
from tinyset.errors import ConfigError
from tinyset.evaluate.protocol import Protocol
from tinyset.evaluate.report import format_table
from tinyset.evaluate.trainer import TrainSettings, test_accuracy, train_ensemble
from tinyset.models import create_model
from tinyset.results import mean_std
from tinyset.rng import derive_seed, make_generator
from tinyset.runtime import resolve_precision

#: below this many optimiser steps per model, torch.compile's start-up cost is not worth paying
COMPILE_MIN_STEPS = 300


def settings_for(protocol: Protocol, num_images: int, device: torch.device, lr: float) -> TrainSettings:
    steps = protocol.train_epochs * -(-num_images // protocol.batch_size)
    compile_ = protocol.compile if protocol.compile is not None else (
        device.type == "cpu" and steps >= COMPILE_MIN_STEPS)
    return TrainSettings(epochs=protocol.train_epochs, decay_epoch=protocol.decay_epoch, lr=lr,
                         momentum=protocol.momentum, weight_decay=protocol.weight_decay,
                         batch_size=protocol.batch_size, lr_decay_factor=protocol.lr_decay_factor,
                         precision=resolve_precision(protocol.precision, device), compile=compile_)


def make_augment(protocol: Protocol, dataset: str) -> DSA | None:
    if protocol.augment == "none":
        return None
    return DSA(protocol.dsa_strategy or default_strategy(dataset))


def evaluate_tensors(images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, test: ImageDataset,
                     models: Sequence[str] = ("convnet",), protocol: Protocol | None = None,
                     seed: int = 0, device: str | torch.device = "cpu", learned_lr: float | None = None,
                     progress: Callable[[str, int, int, float, float], None] | None = None,
                     step_progress: Callable[[str, float, int], None] | None = None) -> dict[str, Any]:
    """Train ``protocol.num_models`` fresh networks of each architecture on ``(images, labels)``.

    Returns a JSON-ready dict: protocol, seed, per-model accuracies with mean and std, seconds.
    ``progress(model, epoch, epochs, loss, train_acc)`` is called after every epoch and
    ``step_progress(model, epochs_done, epochs)`` (``epochs_done`` fractional) after every step.
    """
    protocol = protocol or Protocol.preset("dsa")
    device = torch.device(device)
    lr = protocol.lr if protocol.lr is not None else learned_lr
    if lr is None:
        raise ConfigError("the protocol asks for the set's learned lr (lr=None) but the set has none")
    if test.info.channels != info.channels or tuple(test.info.image_size) != tuple(info.image_size):
        raise ConfigError(f"test set {test.info.name} has images {test.info.channels}x"
                          f"{test.info.image_size} but the set has {info.channels}x{info.image_size}")
    images = images.to(device, torch.float32)
    labels = labels.to(device)
    test_x = test.normalized(device)
    test_y = test.labels.to(device)
    settings = settings_for(protocol, images.shape[0], device, lr)
    augment = make_augment(protocol, info.name)
    root = make_generator(seed)
    rows = []
    for name in models:
        gen = make_generator(derive_seed(root))
        model = create_model(name, info.channels, info.num_classes, info.image_size,
                             members=protocol.num_models, generator=gen, device=device)
        start = time.perf_counter()
        cb = None
        if progress is not None:
            cb = lambda ep, loss, acc, _n=name: progress(_n, ep, protocol.train_epochs, loss, acc)  # noqa: E731
        step_cb = None
        if step_progress is not None:
            step_cb = lambda ep, done, n, _n=name: step_progress(_n, ep + done / n, protocol.train_epochs)  # noqa: E731
        train_ensemble(model, images, labels, settings, gen, augment, on_epoch=cb, on_step=step_cb)
        train_s = time.perf_counter() - start
        accs = test_accuracy(model, test_x, test_y, precision=settings.precision, compile=settings.compile)
        total_s = time.perf_counter() - start
        mean, std = mean_std(accs)
        rows.append({"model": name, "accuracies": accs, "mean": mean, "std": std,
                     "train_seconds": train_s, "seconds": total_s,
                     "seconds_per_model": total_s / protocol.num_models})
    return {
        "protocol": {**protocol.to_dict(), "lr_used": lr, "precision_used": settings.precision,
                     "compiled": settings.compile, "augment_strategy": augment.strategy if augment else "none"},
        "dataset": info.name,
        "num_images": int(images.shape[0]),
        "seed": seed,
        "device": str(device),
        "results": rows,
    }


def evaluate_synset(synset: Any, test: ImageDataset, models: Sequence[str] = ("convnet",),
                    protocol: Protocol | None = None, seed: int = 0, device: str | torch.device = "cpu",
                    progress: Callable[..., None] | None = None,
                    step_progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """Evaluate a :class:`tinyset.synset.SyntheticSet` on the real test split ``test``."""
    res = evaluate_tensors(synset.images, synset.labels, synset.info, test, models, protocol, seed,
                           device, learned_lr=synset.lr, progress=progress, step_progress=step_progress)
    res["synset"] = {"method": synset.meta.get("method"), "ipc": synset.ipc, "num_images": len(synset),
                     "meta": synset.meta}
    return res


def evaluate_full(train: ImageDataset, test: ImageDataset, models: Sequence[str] = ("convnet",),
                  protocol: Protocol | None = None, seed: int = 0, device: str | torch.device = "cpu",
                  progress: Callable[..., None] | None = None,
                  step_progress: Callable[..., None] | None = None) -> dict[str, Any]:
    """The full-dataset baseline: the same networks trained on the whole real training split."""
    protocol = protocol or Protocol.preset("fulldata")
    images = train.normalized(device)
    res = evaluate_tensors(images, train.labels, train.info, test, models, protocol, seed, device,
                           progress=progress, step_progress=step_progress)
    res["synset"] = {"method": "full-dataset", "num_images": len(train)}
    return res


__all__ = ["Protocol", "evaluate_synset", "evaluate_tensors", "evaluate_full", "format_table",
           "train_ensemble", "test_accuracy", "TrainSettings"]
