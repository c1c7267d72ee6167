"""Evaluation protocols: named presets (``presets/evaluate/*.json``) plus overrides.

A protocol may stop training early on a validation split (``early_stop_patience``; off in every
literature preset, on in ``dsa-early``): :func:`hold_out_validation` draws that split from the real
*training* split, :func:`early_stopper` builds the per-network rule of
:class:`tinyset.training.EarlyStopping`.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import torch

from tinyset.augment import AUGMENTATIONS, parse_dc_strategy
from tinyset.data.base import ImageDataset, split_validation
from tinyset.errors import ConfigError
from tinyset.registry import Registry
from tinyset.rng import make_generator
from tinyset.training import EarlyStopping, check_loop_choices, check_number

#: evaluation protocols that do not train networks by SGD (not :class:`Protocol` presets): name ->
#: ``run(synset, test, models, seed, device, precision, num_models) -> EvaluationResult``; each
#: records its own protocol name (``krr-...`` for kernel ridge regression, :mod:`tinyset.evaluate.krr`)
EVALUATORS: Registry = Registry("evaluation protocol")


@dataclass(frozen=True)
class Protocol:
    """How a set is evaluated: train fresh networks on it, report test accuracy after the last epoch."""

    name: str = "dsa"
    source: str = ""
    epochs: int = 1000
    lr: float | None = 0.01  # None: use the synthetic set's learned lr (error if it has none)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    lr_decay_at: float = 0.5
    lr_decay_factor: float = 0.1
    #: "fraction": ``epochs`` passes, lr decayed after ``lr_decay_at * epochs`` of them.
    #: "reference": upstream's schedule (the DC/DSA/DM ``evaluate_synset`` loop): epochs+1 passes over the
    #: data, lr x0.1 from pass epochs//2+3 on (counting passes from 1), i.e. the first epochs//2+2 at full lr.
    schedule: str = "fraction"
    augment: str = "dsa"  # a name of tinyset.augment.AUGMENTATIONS: dsa | dc | none
    dsa_strategy: str | None = None  # None: the dataset's default (no flips for digits)
    #: with augment "dc": the DC paper's ops joined by "_" (crop_scale_rotate, crop_noise, ...);
    #: None: the paper's rule per architecture (tinyset.augment.dc.dc_rule)
    dc_strategy: str | None = None
    num_models: int = 5
    precision: str = "auto"  # auto | fp32 | bf16
    compile: bool | None = None  # None: compile when the run is long enough to pay for it
    #: early stopping (None: off, as in every literature protocol): a network stops once its accuracy
    #: on the validation split has not improved for this many epochs, and is tested with the weights
    #: of its best validation epoch (:class:`tinyset.training.EarlyStopping`)
    early_stop_patience: int | None = None
    #: with early stopping: validate every this many epochs (and after the last one)
    val_every: int = 10
    #: with early stopping: images per class held out of the real *training* split as the validation
    #: split (seeded by the evaluation seed, :func:`hold_out_validation`); never the test split
    val_per_class: int = 100
    #: the training loop's optimiser, loss and lr schedule (:class:`tinyset.training.TrainSettings`):
    #: sgd / ce / step in every DC-family protocol; the ``frepo`` protocol trains with adam / mse /
    #: warmup_cosine (warm-up steps, then a cosine to ``lr * final_lr_factor``)
    optimizer: str = "sgd"
    loss: str = "ce"
    lr_schedule: str = "step"
    warmup_steps: int = 0
    final_lr_factor: float = 0.0
    #: optimiser steps by the number of images of the set (keys are image counts as strings, as in
    #: JSON): a set whose size is listed trains for that many steps (rounded up to whole epochs)
    #: instead of ``epochs``; None: always ``epochs``
    steps_by_images: dict[str, int] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Reject impossible values: every number finite and in range, the messages name the field."""
        own = "protocol"
        ints = {"epochs": 1, "num_models": 1, "batch_size": 1, "val_every": 1, "val_per_class": 1}
        for name, low in ints.items():
            object.__setattr__(self, name, check_number(own, name, getattr(self, name), low=low, integer=True))
        if self.lr is not None:
            object.__setattr__(self, "lr", check_number(own, "lr", self.lr, low=0, low_open=True))
        if self.early_stop_patience is not None:
            object.__setattr__(self, "early_stop_patience", check_number(
                own, "early_stop_patience", self.early_stop_patience, low=1, integer=True))
        object.__setattr__(self, "momentum", check_number(own, "momentum", self.momentum, low=0, high=1,
                                                          high_open=True))
        object.__setattr__(self, "weight_decay", check_number(own, "weight_decay", self.weight_decay, low=0))
        object.__setattr__(self, "lr_decay_at", check_number(own, "lr_decay_at", self.lr_decay_at, low=0,
                                                             high=1))
        object.__setattr__(self, "lr_decay_factor", check_number(own, "lr_decay_factor", self.lr_decay_factor,
                                                                 low=0, high=1, low_open=True))
        if self.augment not in AUGMENTATIONS:
            raise ConfigError(f"protocol augment must be one of {', '.join(AUGMENTATIONS.names())}, "
                              f"got {self.augment!r}")
        if self.dc_strategy is not None:
            parse_dc_strategy(self.dc_strategy)
        if self.schedule not in ("fraction", "reference"):
            raise ConfigError(f"protocol schedule must be 'fraction' or 'reference', got {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"protocol precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        warmup, final = check_loop_choices(own, self)
        object.__setattr__(self, "warmup_steps", warmup)
        object.__setattr__(self, "final_lr_factor", final)
        if self.steps_by_images is not None:
            if not isinstance(self.steps_by_images, dict):
                raise ConfigError(f"protocol steps_by_images must be a mapping of image counts to step counts, "
                                  f"got {self.steps_by_images!r}")
            table = {}
            for key, steps in self.steps_by_images.items():
                images = check_number(own, "steps_by_images key", int(key) if str(key).isdigit() else key,
                                      low=1, integer=True)
                table[str(images)] = check_number(own, f"steps_by_images[{key!r}]", steps, low=1, integer=True)
            object.__setattr__(self, "steps_by_images", table)
        if self.compile not in (None, True, False):
            raise ConfigError(f"protocol compile must be true, false or null (automatic), got {self.compile!r}")

    @property
    def early_stopping(self) -> bool:
        """Whether this protocol stops early on a validation split."""
        return self.early_stop_patience is not None

    @property
    def train_epochs(self) -> int:
        """Passes over the training set that this protocol runs."""
        return self.epochs + 1 if self.schedule == "reference" else self.epochs

    @property
    def decay_epoch(self) -> int:
        """Index of the first pass trained at the decayed learning rate."""
        if self.schedule == "reference":
            return self.epochs // 2 + 2
        return int(self.epochs * self.lr_decay_at)

    def for_set_size(self, num_images: int) -> "Protocol":
        """This protocol for a set of ``num_images`` images: with ``steps_by_images`` listing that
        count (and ``epochs`` not set explicitly), ``epochs`` becomes the listed steps over the steps
        per epoch, rounded up (the result records it); otherwise the protocol itself."""
        steps = (self.steps_by_images or {}).get(str(int(num_images)))
        if steps is None or "epochs" in self.overrides:  # an explicit --epochs wins
            return self
        epochs = -(-steps // -(-int(num_images) // self.batch_size))
        return self if epochs == self.epochs else replace(self, epochs=epochs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["train_epochs"], d["decay_epoch"] = self.train_epochs, self.decay_epoch
        if not d["overrides"]:
            d.pop("overrides")
        return d

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "Protocol":
        """Load the named preset and apply ``overrides`` (``None`` values are ignored)."""
        data = load_preset("evaluate", name)
        known = set(cls.__dataclass_fields__)
        bad = [k for k in data if k not in known]
        if bad:
            raise ConfigError(f"evaluate preset {name!r} has unknown keys {bad}")
        proto = cls(**data)
        return proto.with_overrides(**overrides)

    def with_overrides(self, **overrides: Any) -> "Protocol":
        given = {k: v for k, v in overrides.items() if v is not None}
        bad = [k for k in given if k not in self.__dataclass_fields__]
        if bad:
            raise ConfigError(f"unknown protocol setting(s) {bad}")
        if not given:
            return self
        return replace(self, **given, overrides={**self.overrides, **given})


def _preset_folder():
    from importlib import resources

    return resources.files("tinyset.presets").joinpath("evaluate")


def list_presets() -> list[str]:
    """Names of the evaluation protocol presets (``presets/evaluate/*.json``)."""
    folder = _preset_folder()
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json")) if folder.is_dir() else []


def load_preset(kind: str, name: str) -> dict[str, Any]:
    """The evaluation preset ``name`` as a dict (each file names its ``source``)."""
    import json

    path = _preset_folder().joinpath(f"{name}.json")
    if not path.is_file():
        raise ConfigError(f"no {kind} preset named {name!r} (an evaluation protocol); known: {', '.join(list_presets()) or 'none'}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"protocol file {path} is not valid JSON: {exc}") from None
    if "source" not in data:
        raise ConfigError(f"protocol file {path} has no 'source' field")
    return data


# ---------------------------------------------------------------- early stopping

def validation_seed(seed: int) -> int:
    """The seed of the evaluation's validation split for evaluation seed ``seed``: a hash, so the
    split is its own random stream (no draw of the training generator is spent on it)."""
    digest = hashlib.sha256(f"tinyset.evaluate:{int(seed)}:validation".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**62 - 1)


def hold_out_validation(train: ImageDataset, protocol: Protocol | int, seed: int, exclude: Sequence[int] = (),
                        what: str = "the set") -> tuple[ImageDataset, ImageDataset, dict[str, Any]]:
    """The validation split of an evaluation (for early stopping, or to score on), held out of the
    real training split.

    ``exclude``: indices into ``train`` that may not be validation images (the real images a
    coreset was selected from, ``meta["source_indices"]``): they are removed first. From the rest,
    ``protocol.val_per_class`` images of every class (``protocol`` may be that number itself) are
    drawn with :func:`validation_seed` (:func:`tinyset.data.split_validation`). Returns ``(rest,
    val, description)``: ``rest`` is the training split without the validation images and without
    ``exclude`` (what the full-data baseline trains on), ``description`` what the result records.
    """
    if train.split != "train":
        raise ConfigError(f"the validation split is held out of the training split; "
                          f"got the {train.split!r} split of {train.info.name}")
    per_class = protocol if isinstance(protocol, int) else protocol.val_per_class
    n = len(train)
    idx = torch.as_tensor(list(exclude), dtype=torch.int64)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        bad = int(idx.max()) if int(idx.max()) >= n else int(idx.min())
        raise ConfigError(f"{what} names training image {bad} of {train.info.name} but its training split has "
                          f"{n} images (indices 0..{n - 1}); was it selected from another copy of the dataset?")
    keep = torch.ones(n, dtype=torch.bool)
    keep[idx] = False
    pool = train if bool(keep.all()) else ImageDataset(train.info, train.split, train.images[keep],
                                                       train.labels[keep], train.source)
    vseed = validation_seed(seed)
    rest, val = split_validation(pool, per_class, make_generator(vseed))
    desc = {"split": f"validation, held out of the training split of {train.info.name}",
            "per_class": per_class, "images": len(val), "seed": vseed,
            "excluded_set_images": int(n - int(keep.sum()))}
    return rest, val, desc


def early_stopper(protocol: Protocol, val_images: torch.Tensor | None,
                  val_labels: torch.Tensor | None) -> EarlyStopping | None:
    """The early-stopping rule of ``protocol`` on the (normalised) validation images, or None when
    the protocol does not stop early. A fresh one per ensemble."""
    if not protocol.early_stopping:
        return None
    if val_images is None or val_labels is None:
        raise ConfigError(f"protocol {protocol.name!r} stops early (early_stop_patience="
                          f"{protocol.early_stop_patience}) and needs a validation split held out of the real "
                          f"training split: pass the training split (train=...) or a validation split (val=...)")
    return EarlyStopping(val_images, val_labels, protocol.early_stop_patience, every=protocol.val_every)


def validation_for_set(synset: Any, train: ImageDataset | None, protocol: Protocol, seed: int
                       ) -> tuple[ImageDataset | None, dict[str, Any] | None]:
    """The validation split for evaluating ``synset`` under ``protocol``: ``(None, None)`` when the
    protocol does not stop early or no training split is given (:func:`early_stopper` then says
    what is missing); else :func:`held_out_for_set`."""
    if not protocol.early_stopping or train is None:
        return None, None
    return held_out_for_set(synset, train, protocol.val_per_class, seed)


def held_out_for_set(synset: Any, train: ImageDataset, per_class: int, seed: int
                     ) -> tuple[ImageDataset, dict[str, Any]]:
    """``(val, description)``: ``per_class`` images of every class held out of the real training
    split ``train`` (:func:`hold_out_validation`, seeded by the evaluation ``seed``), never one of
    the set's own source images (``meta["source_indices"]`` of a set selected from the training
    split, e.g. a coreset). A distilled set records no source images: its method saw the whole
    training split, these images included (the description says so)."""
    meta = getattr(synset, "meta", {}) or {}
    exclude = (meta.get("source_indices") or ()) if meta.get("source_split", "train") == "train" else ()
    _, val, desc = hold_out_validation(train, per_class, seed, exclude,
                                       what=f"the set (method {meta.get('method')}, source_indices)")
    desc["set_source_images_excluded"] = bool(meta.get("source_indices"))
    return val, desc


def stop_record(stopper: EarlyStopping | None, epochs: int) -> dict[str, Any]:
    """The per-architecture fields of :class:`tinyset.results.ModelScore` about early stopping
    (``epochs_trained`` alone, ``epochs``, without it)."""
    if stopper is None:
        return {"epochs_trained": epochs}
    r = stopper.record()
    return {"epochs_trained": r["epochs_run"], "val_seconds": r["val_seconds"], "stop_epochs": r["stop_epochs"],
            "best_epochs": r["best_epochs"], "val_accuracies": r["val_accuracies"]}


def _register_evaluators() -> None:
    """Import the modules that register non-SGD protocols in :data:`EVALUATORS` (they import this one)."""
    import importlib

    importlib.import_module("tinyset.evaluate.krr")


_register_evaluators()
