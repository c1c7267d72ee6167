"""Evaluation: train fresh networks on a set and report real test accuracy (mean ± std).

The protocol (``Protocol``) is recorded with every result. Nothing here looks at the test set
except to report the final accuracy of every trained model. Networks are trained by the one
training loop of tinyset, :func:`tinyset.training.train_ensemble`, and tested by
:func:`tinyset.training.test_accuracy` (both re-exported here).

Every result names its label regime (:func:`~tinyset.results.label_regime`): ``hard`` (one-hot
labels, the protocol's lr), ``learned (...)`` (soft labels and/or an lr learned by the method and
stored in the set: soft cross-entropy on the stored rows, the stored lr when the protocol's ``lr``
is null) or ``teacher (T=...)`` (every image relabelled once by a teacher network,
:mod:`tinyset.evaluate.teacher`). A set that carries a ZCA transform has its test images whitened
with it (:func:`test_images`).
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch

from tinyset.augment import AUGMENTATIONS
from tinyset.data.base import DatasetInfo, ImageDataset
from tinyset.data.zca import Zca
from tinyset.errors import ConfigError
from tinyset.evaluate.krr import TARGETS_EXTRA, regression_targets, set_targets
from tinyset.evaluate.protocol import (Protocol, early_stopper, held_out_for_set, hold_out_validation, stop_record,
                                      validation_for_set)
from tinyset.evaluate.report import check_same_regime, comparison_table, format_table
from tinyset.evaluate.teacher import Teacher, parse_teacher
from tinyset.models import MODELS, create_model
from tinyset.models.layers import mixes_images
from tinyset.results import EvaluationResult, ModelScore, label_regime, mean_std
from tinyset.rng import derive_seed, make_generator
from tinyset.runtime import resolve_precision
from tinyset.training import TrainSettings, compile_errors, compile_status, test_accuracy, train_ensemble

#: below this many optimiser steps per model, torch.compile's start-up cost is not worth paying
COMPILE_MIN_STEPS = 300

#: ``progress(model, epoch, epochs, loss, train_acc)`` after every epoch
EpochProgress = Callable[[str, int, int, float, float], None]
#: ``step_progress(model, epochs_done, epochs)`` after every training step (``epochs_done`` fractional)
StepProgress = Callable[[str, float, int], None]
#: ``test_progress(model, batches_done, batches_total)`` after every batch of the test pass
TestProgress = Callable[[str, int, int], None]


def settings_for(protocol: Protocol, num_images: int, device: torch.device, lr: float) -> TrainSettings:
    steps = protocol.train_epochs * -(-num_images // protocol.batch_size)
    compile_ = protocol.compile if protocol.compile is not None else (
        device.type == "cpu" and steps >= COMPILE_MIN_STEPS)
    return TrainSettings(epochs=protocol.train_epochs, decay_epoch=protocol.decay_epoch, lr=lr,
                         momentum=protocol.momentum, weight_decay=protocol.weight_decay,
                         batch_size=protocol.batch_size, lr_decay_factor=protocol.lr_decay_factor,
                         precision=resolve_precision(protocol.precision, device), compile=compile_,
                         optimizer=protocol.optimizer, loss=protocol.loss, lr_schedule=protocol.lr_schedule,
                         warmup_steps=protocol.warmup_steps, final_lr_factor=protocol.final_lr_factor)


def make_augment(protocol: Protocol, dataset: str, model: str | None = None,
                 info: DatasetInfo | None = None) -> Any:
    """The train-time augmentation ``protocol`` prescribes for ``model`` on ``dataset`` (None: none).

    A lookup in :data:`tinyset.augment.AUGMENTATIONS`. A rule that depends on the architecture
    (the DC paper's: BatchNorm networks get ``crop_noise``) builds a one-network ``model`` for
    ``info`` to look; without ``model`` the architecture counts as one without BatchNorm.
    """
    def has_batchnorm() -> bool:
        if model is None or info is None:
            return False
        net = create_model(model, info.channels, info.num_classes, info.image_size, members=1,
                           generator=make_generator(0))
        return mixes_images(net)

    return AUGMENTATIONS.get(protocol.augment)(protocol, dataset, has_batchnorm)


def augment_name(augment: Any) -> str:
    """What the result records of an augmentation: its kind and strategy."""
    if augment is None:
        return "none"
    kind = augment.to_dict().get("kind", "dsa")
    return augment.strategy if kind == "dsa" else f"{kind}:{augment.strategy}"


def check_models(models: Sequence[str] | str, info: DatasetInfo | None = None) -> list[str]:
    """The architecture names of ``models`` (a list, or one comma-separated string), checked.

    Raises :class:`~tinyset.errors.ConfigError` for an empty list, for names that are not in
    :data:`tinyset.models.MODELS` (all of them listed, with the known names) and, given ``info``,
    for architectures that cannot be built for its images. Nothing is trained.
    """
    given = repr(models) if isinstance(models, str) else repr(list(models))
    if isinstance(models, str):
        models = [m for m in models.split(",")]
    names = [str(m).strip() for m in models if str(m).strip()]
    if not names:
        raise ConfigError(f"--models names no architecture (got {given}); expected one or more of: "
                          f"{', '.join(MODELS.names())} (see `tinyset models`)")
    bad = [n for n in names if n not in MODELS]
    if bad:
        raise ConfigError(f"--models: unknown architecture{'s' if len(bad) > 1 else ''} "
                          f"{', '.join(repr(b) for b in bad)}; known: {', '.join(MODELS.names())}")
    if info is not None:
        for n in names:  # a one-member build (throwaway weights) catches size mismatches early
            create_model(n, info.channels, info.num_classes, info.image_size, members=1,
                         generator=make_generator(0))
    return names


def test_images(test: ImageDataset, device: str | torch.device, zca: Zca | None = None) -> torch.Tensor:
    """The test split normalised on ``device`` and, for a set that carries a ZCA transform, whitened
    with it (the networks train in the whitened space)."""
    x = test.normalized(device)
    return x if zca is None else zca.whiten(x, inplace=True)


test_images.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def evaluate_tensors(images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, test: ImageDataset,
                     models: Sequence[str] = ("convnet",), protocol: Protocol | None = None,
                     seed: int = 0, device: str | torch.device = "cpu", learned_lr: float | None = None,
                     progress: EpochProgress | None = None, step_progress: StepProgress | None = None,
                     test_progress: TestProgress | None = None, zca: Zca | None = None,
                     regime: str | None = None, val: ImageDataset | None = None) -> EvaluationResult:
    """Train ``protocol.num_models`` fresh networks of each architecture on ``(images, labels)``.

    Returns an :class:`~tinyset.results.EvaluationResult`: the protocol (with ``lr_used``,
    ``precision_used``, ``compiled`` -- whether every network really ran compiled -- and
    ``augment_strategy``), seed, and one :class:`~tinyset.results.ModelScore` per architecture
    (test accuracy of every network, mean, std, seconds). The model list is checked before any
    training. Callbacks, all optional:

    * ``progress(model, epoch, epochs, loss, train_acc)`` after every epoch;
    * ``step_progress(model, epochs_done, epochs)`` (``epochs_done`` fractional) after every step;
    * ``test_progress(model, batches_done, batches_total)`` after every batch of the test pass
      that follows a model's training (a full test split is tens of batches).

    ``zca``: the whitening ``images`` live in; the test images get the same (recorded as
    ``protocol["zca"]``). ``regime``: the label regime to record (default: :func:`label_regime` of
    the labels given and of whether the protocol takes ``learned_lr``).

    ``val``: the validation split of a protocol that stops early (``early_stop_patience``), held
    out of the real training split by the caller (:func:`~tinyset.evaluate.protocol.hold_out_validation`;
    required by such a protocol, ignored otherwise). Each architecture's networks then stop on it
    independently (:class:`tinyset.training.EarlyStopping`) and are tested with the weights of
    their best validation epoch; the rows record stop and best epochs. Every row records the
    ensemble's training time (validation passes included) and its test-pass time apart.
    """
    protocol = (protocol or Protocol.preset("dsa")).for_set_size(images.shape[0])
    names = check_models(models, info)
    device = torch.device(device)
    lr = protocol.lr if protocol.lr is not None else learned_lr
    if lr is None:
        raise ConfigError("the protocol asks for the set's learned lr (lr=None) but the set has none")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"the set's learned lr must be a finite number > 0, got {lr!r}")
    if regime is None:
        regime = label_regime(labels.dim() == 2, protocol.lr is None)
    if protocol.loss == "mse" and labels.dim() == 1:
        labels = regression_targets(labels, info.num_classes)
    if test.info.channels != info.channels or tuple(test.info.image_size) != tuple(info.image_size):
        raise ConfigError(f"test set {test.info.name} has images {test.info.channels}x"
                          f"{test.info.image_size} but the set has {info.channels}x{info.image_size}")
    images = images.to(device, torch.float32)
    labels = labels.to(device)
    test_x = test_images(test, device, zca)
    test_y = test.labels.to(device)
    val_x = test_images(val, device, zca) if val is not None and protocol.early_stopping else None
    val_y = val.labels.to(device) if val_x is not None else None
    settings = settings_for(protocol, images.shape[0], device, lr)
    # every architecture's augmentation first: a refused rule costs no training
    augments = {name: make_augment(protocol, info.name, name, info) for name in names}
    root = make_generator(seed)
    rows: list[ModelScore] = []
    compiled_all = settings.compile
    fallbacks: dict[str, dict[str, str]] = {}
    for name in names:
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
        test_cb = None
        if test_progress is not None:
            test_cb = lambda done, n, _n=name: test_progress(_n, done, n)  # noqa: E731
        stopper = early_stopper(protocol, val_x, val_y)
        train_ensemble(model, images, labels, settings, gen, augments[name], on_epoch=cb, on_step=step_cb,
                       early_stop=stopper)
        train_s = time.perf_counter() - start
        accs = test_accuracy(model, test_x, test_y, precision=settings.precision, compile=settings.compile,
                             progress=test_cb)
        total_s = time.perf_counter() - start
        if settings.compile:
            status = compile_status(model)
            compiled_all = compiled_all and all(status.values())
            if compile_errors(model):
                fallbacks[name] = compile_errors(model)
        mean, std = mean_std(accs)
        rows.append(ModelScore(model=name, accuracies=accs, mean=mean, std=std, train_seconds=train_s,
                               seconds=total_s, seconds_per_model=total_s / protocol.num_models,
                               label_regime=regime, test_seconds=total_s - train_s,
                               **stop_record(stopper, settings.epochs)))
    proto = {**protocol.to_dict(), "lr_used": lr, "precision_used": settings.precision,
             "compiled": bool(compiled_all), "augment_strategy": ""}
    strategies = {name: augment_name(a) for name, a in augments.items()}
    # one string when every architecture trained with the same augmentation, else one per architecture
    proto["augment_strategy"] = (next(iter(strategies.values())) if len(set(strategies.values())) == 1
                                 else strategies)
    if fallbacks:
        proto["compile_fallback"] = fallbacks
    if zca is not None:
        proto["zca"] = zca.describe()
    if val_x is not None:
        proto["validation"] = {"split": val.split, "images": len(val)}
    return EvaluationResult(protocol=proto, dataset=info.name, num_images=int(images.shape[0]), seed=seed,
                            device=str(device), results=rows, label_regime=regime)


def teacher_labels(synset: Any, teacher: Teacher, device: str | torch.device) -> torch.Tensor:
    """The ``teacher`` regime's labels of a set: every image relabelled once with the teacher's
    softmax (after checking that the teacher fits the set's dataset)."""
    teacher.check(synset.info, f"the set ({synset.info.name}, method {synset.meta.get('method')})")
    return teacher.label(synset.images.to(device, torch.float32), synset.zca)


def evaluate_synset(synset: Any, test: ImageDataset | None, models: Sequence[str] = ("convnet",),
                    protocol: Protocol | None = None, seed: int = 0, device: str | torch.device = "cpu",
                    progress: EpochProgress | None = None, step_progress: StepProgress | None = None,
                    test_progress: TestProgress | None = None, teacher: Teacher | None = None,
                    train: ImageDataset | None = None, split: str = "test") -> EvaluationResult:
    """Evaluate a :class:`tinyset.synset.SyntheticSet` on the real test split ``test``.

    As :func:`evaluate_tensors`: trains on the set's stored labels (soft cross-entropy for soft
    ones; under a protocol with the ``mse`` loss, the set's learned regression targets when it
    stores them, else its labels as centred rows) and, when the protocol's lr is null, its learned lr; the test images get the set's ZCA
    transform when it carries one. With ``teacher`` (:class:`~tinyset.evaluate.teacher.Teacher`)
    the labels are the teacher's instead (recorded as ``protocol["teacher"]``). The result's
    ``set`` says what was evaluated (method, ipc, number of images, the set's metadata) and
    ``label_regime`` under which labels. ``train``: the real training split, needed by a protocol
    that stops early: its validation split is held out of it (never containing the set's own source
    images, :func:`~tinyset.evaluate.protocol.validation_for_set`) and recorded as
    ``protocol["validation"]``.

    ``split="validation"`` scores the networks on images held out of the real training split
    ``train`` instead (``protocol.val_per_class`` per class, :func:`~tinyset.evaluate.protocol.
    held_out_for_set`; ``test`` is not used and may be None): the accuracy to choose settings by,
    which the test split never is. The result's ``scored_on`` records which split it was.
    """
    protocol = protocol or Protocol.preset("dsa")
    test, scored_on = scored_split(synset, test, train, split, protocol.val_per_class, seed,
                                   early_stopping=protocol.early_stopping)
    val, val_desc = validation_for_set(synset, train, protocol, seed)
    labels, regime = synset.labels, None
    if teacher is None and protocol.loss == "mse" and TARGETS_EXTRA in (getattr(synset, "extras", None) or {}):
        # a set with learned regression targets (``--method krr``) regresses on them, not on its labels
        labels = set_targets(synset)[0]
        regime = label_regime(True, protocol.lr is None, label_kind="regression targets")
    if teacher is not None:
        check_models(models, synset.info)  # names first: relabelling is wasted on a typo
        labels = teacher_labels(synset, teacher, device)
        regime = label_regime(True, protocol.lr is None, teacher.temperature)
    res = evaluate_tensors(synset.images, labels, synset.info, test, models, protocol, seed,
                           device, learned_lr=synset.lr, progress=progress, step_progress=step_progress,
                           test_progress=test_progress, zca=synset.zca, regime=regime, val=val)
    if val_desc is not None:
        res.protocol["validation"] = val_desc
    if teacher is not None:
        res.protocol["teacher"] = teacher.describe()
    res.set = {"method": synset.meta.get("method"), "ipc": synset.ipc, "num_images": len(synset),
               "meta": synset.meta}
    res.scored_on = scored_on
    return res


#: the real images an evaluation can score its networks on
SPLITS = ("test", "validation")


def check_split(split: str, early_stopping: bool = False) -> None:
    """Refuse an unknown ``split``, and the validation split under an early-stopping protocol."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "validation" and early_stopping:
        raise ConfigError("an early-stopping protocol chooses each network's epoch on the validation split; "
                          "scoring on that split as well would report the accuracy it was chosen by. Use a "
                          "protocol without early stopping (e.g. dsa) with --split validation")


def scored_split(synset: Any, test: ImageDataset | None, train: ImageDataset | None, split: str, per_class: int,
                 seed: int, early_stopping: bool = False) -> tuple[ImageDataset, dict[str, Any]]:
    """``(images to score on, the result's scored_on record)`` for ``split`` (:data:`SPLITS`): the
    test split ``test``, or ``per_class`` images of every class held out of the training split
    ``train`` for ``synset`` (:func:`~tinyset.evaluate.protocol.held_out_for_set`)."""
    check_split(split, early_stopping)
    if split == "test":
        if test is None:
            raise ConfigError("scoring on the test split needs the test split (test=...)")
        return test, {"split": "test"}
    if train is None:
        raise ConfigError("scoring on the validation split needs the real training split (train=...): the "
                          "validation images are held out of it")
    val, desc = held_out_for_set(synset, train, per_class, seed)
    desc["description"] = desc.pop("split")
    return val, {"split": "validation", **desc}


def evaluate_full(train: ImageDataset, test: ImageDataset, models: Sequence[str] = ("convnet",),
                  protocol: Protocol | None = None, seed: int = 0, device: str | torch.device = "cpu",
                  progress: EpochProgress | None = None, step_progress: StepProgress | None = None,
                  test_progress: TestProgress | None = None) -> EvaluationResult:
    """The full-dataset baseline: the same networks trained on the whole real training split.

    As :func:`evaluate_tensors`; the result's ``set`` is ``{"method": "full-dataset", "num_images": N}``.
    A protocol that stops early holds its validation split out of ``train`` first and trains on
    the rest (``N`` counts the rest).
    """
    protocol = protocol or Protocol.preset("fulldata")
    check_models(models)  # names, before normalising the whole training split
    val = val_desc = None
    if protocol.early_stopping:
        train, val, val_desc = hold_out_validation(train, protocol, seed)
    images = train.normalized(device)
    res = evaluate_tensors(images, train.labels, train.info, test, models, protocol, seed, device,
                           progress=progress, step_progress=step_progress, test_progress=test_progress, val=val)
    if val_desc is not None:
        res.protocol["validation"] = val_desc
    res.set = {"method": "full-dataset", "num_images": len(train)}
    return res


__all__ = ["Protocol", "evaluate_synset", "evaluate_tensors", "evaluate_full", "format_table", "check_models",
           "settings_for", "make_augment", "train_ensemble", "test_accuracy", "TrainSettings", "label_regime",
           "test_images", "teacher_labels", "regression_targets", "Teacher", "parse_teacher", "comparison_table", "check_same_regime",
           "SPLITS", "check_split", "scored_split"]
