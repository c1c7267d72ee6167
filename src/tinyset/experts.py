"""Expert trajectories: networks trained on the real training set, saved after every epoch.

Trajectory matching (MTT, :mod:`tinyset.methods.mtt`) needs the parameters of many networks at
every epoch of their training on real data. :func:`train_experts` trains ``num_experts`` of them
and :class:`ExpertSet` reads them back lazily, one (expert, epoch) at a time.

Training
--------
Plain SGD on the training split minus a held-out validation split (``val_per_class`` images per
class, :func:`tinyset.data.base.split_validation`): by default lr 0.01, no momentum, no weight
decay, batch 256, DSA augmentation (the dataset's default strategy), 50 epochs -- the defaults of
MTT's ``buffer.py``. ``lr_decay=True`` multiplies the lr by 0.1 from training epoch
``epochs // 2 + 2`` on (0-based; the reference lowers it after epoch ``epochs // 2 + 1``).
Experts are trained ``members`` at a time as one batched ensemble (:mod:`tinyset.models.layers`)
through the one training loop of tinyset, :func:`tinyset.training.train_ensemble`, called once per
epoch: each member draws its own shuffles and augmentations, exactly as if trained alone. Plain
SGD keeps no optimiser state, so one call per epoch is the same computation as one call for all
epochs. Momentum is not offered (the reference trains experts without it, and the loop keeps its
momentum buffers to itself).

Every random choice comes from generators seeded by ``(seed, purpose, index)`` (see
:func:`sub_seed`): the validation split, the initialisation of expert ``i`` (so expert ``i`` starts
from ``create_model(model, ..., generator=make_generator(init_seed))`` whatever the chunk size),
and the shuffles/augmentations of chunk ``c``.

Folder layout
-------------
::

    DIR/manifest.json                       what the set is; rewritten atomically after every epoch
    DIR/chunk_0000/epoch_0000.safetensors   experts 0..members-1 at initialisation
    DIR/chunk_0000/epoch_0001.safetensors   ... after training epoch 1
    ...
    DIR/chunk_0000/epoch_00E.safetensors    ... after the last epoch E
    DIR/chunk_0001/...                      experts members..2*members-1

A shard ``chunk_C/epoch_T.safetensors`` holds, for every expert ``i`` of chunk ``C``, its whole
state (parameters and buffers) after ``T`` epochs as tensors ``expert.<i>.<state key>`` (the keys
of a one-member network's ``state_dict``), plus ``rng.generator``, the state of the chunk's
generator at that point (what resuming needs). Its safetensors metadata ``tinyset`` is a JSON
header ``{"format": "tinyset.experts.shard", "format_version": 1, "chunk": C, "epoch": T,
"experts": [...]}``. Every shard is written atomically (temporary file + rename) and copied to disk
from a clone of the live weights, so no stored epoch can alias another.

``manifest.json`` (format ``tinyset.experts``) holds the dataset (name, shape, classes,
normalisation), ``zca`` (whether the experts trained on ZCA-whitened images: ``zca=True`` fits
:class:`tinyset.data.zca.Zca` on the training images minus the validation split, whitens both and
stores the transform as ``DIR/zca.safetensors``), the model and its arguments, the
optimiser settings, the augmentation, the seed, the number of epochs, the validation split, and per
expert its chunk, init seed, last completed epoch, training loss and validation accuracy per epoch
(epoch 0 = at initialisation). It is written when training starts and again after every completed
epoch of every chunk, always after that epoch's shard: a ``kill -9`` loses at most the epoch in
progress (of the ``members`` experts being trained together; ``members=1`` loses one epoch of one
expert). ``--resume`` continues every unfinished chunk from its last completed epoch, bit-exactly
on CPU.

With ``settings.curriculum`` (a :class:`Curriculum`, PAD's data selection) every epoch trains on a
subset of the training images chosen by their EL2N difficulty (easy first, harder added, easiest
removed late); the schedule, the scores' provenance and the per-epoch subset sizes are recorded in
the manifest, the scores in ``DIR/difficulty.safetensors``.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tinyset import __version__
from tinyset.augment import DSA, default_strategy
from tinyset.data.base import DatasetInfo, ImageDataset, split_validation
from tinyset.data.zca import Zca
from tinyset.errors import ArtifactError, ConfigError
from tinyset.files import RunLock, atomic_path, clean_stale_temps, read_tagged_safetensors, write_json
from tinyset.models import MODELS, TinyNet, create_model, extract_member, stack_members
from tinyset.rng import make_generator
from tinyset.runtime import resolve_precision
from tinyset.training import TrainSettings, check_number, test_accuracy, train_ensemble

FORMAT = "tinyset.experts"
SHARD_FORMAT = "tinyset.experts.shard"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: the ZCA transform of an expert set trained with ``zca=True``
ZCA_FILE = "zca.safetensors"
#: below this many optimiser steps per chunk, torch.compile's start-up cost is not worth paying
COMPILE_MIN_STEPS = 300

#: ``progress(expert_epochs_done, expert_epochs_total, status)``: after every optimiser step
#: (fractional progress, ``status["kind"] == "step"``) and after every saved epoch
#: (``status["kind"] == "epoch"`` with ``chunk``, ``epoch``, ``loss`` and ``val_acc``, the chunk's mean)
ProgressHook = Callable[[float, int, dict], None]


def sub_seed(seed: int, purpose: str, index: int = 0) -> int:
    """A 62-bit seed for ``(seed, purpose, index)``: independent streams without touching any RNG."""
    digest = hashlib.sha256(f"tinyset.experts:{int(seed)}:{purpose}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**62 - 1)


@dataclass
class ExpertSettings:
    """How experts are trained (defaults: MTT's ``buffer.py``; see the module docstring)."""

    epochs: int = 50
    lr: float = 0.01
    weight_decay: float = 0.0
    batch_size: int = 256
    lr_decay: bool = False
    members: int = 10
    val_per_class: int | None = None  # None: min(100, a tenth of the smallest class)
    dsa_strategy: str | None = None  # None: the dataset's default; "none": no augmentation
    precision: str = "fp32"  # fp32 | bf16 | auto
    compile: bool | None = None  # None: on CPU when a chunk takes at least COMPILE_MIN_STEPS steps
    zca: bool = False  # train on ZCA-whitened images (tinyset.data.zca)
    curriculum: "Curriculum | None" = None  # PAD's data-selection schedule (see Curriculum); None: all data

    def __post_init__(self) -> None:
        own = "experts"
        if self.curriculum is not None and not isinstance(self.curriculum, Curriculum):
            raise ConfigError(f"experts curriculum must be a Curriculum or None, got {self.curriculum!r}")
        self.epochs = check_number(own, "epochs", self.epochs, low=1, high=100_000, integer=True)
        self.lr = check_number(own, "lr", self.lr, low=0, low_open=True)
        self.weight_decay = check_number(own, "weight_decay", self.weight_decay, low=0)
        self.batch_size = check_number(own, "batch_size", self.batch_size, low=1, high=65536, integer=True)
        self.members = check_number(own, "members", self.members, low=1, high=1024, integer=True)
        if self.val_per_class is not None:
            self.val_per_class = check_number(own, "val_per_class", self.val_per_class, low=1, integer=True)
        if not isinstance(self.lr_decay, bool):
            raise ConfigError(f"experts lr_decay must be true or false, got {self.lr_decay!r}")
        if not isinstance(self.zca, bool):
            raise ConfigError(f"experts zca must be true or false, got {self.zca!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"experts precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if self.compile not in (None, True, False):
            raise ConfigError(f"experts compile must be true, false or none (automatic), got {self.compile!r}")

    @property
    def first_decayed_epoch(self) -> int | None:
        """0-based training epoch from which the lr is ``lr * 0.1`` (None: never)."""
        if not self.lr_decay:
            return None
        ep = self.epochs // 2 + 2
        return ep if ep < self.epochs else None

    def lr_at(self, epoch: int) -> float:
        """The lr of 0-based training epoch ``epoch``."""
        d = self.first_decayed_epoch
        return self.lr * 0.1 if d is not None and epoch >= d else self.lr


def default_val_per_class(data: ImageDataset) -> int:
    """min(100, a tenth of the smallest class), at least 1."""
    return max(1, min(100, min(data.class_counts()) // 10))


def shard_name(chunk: int, epoch: int) -> str:
    return f"chunk_{chunk:04d}/epoch_{epoch:04d}.safetensors"


# ---------------------------------------------------------------------------------- training
def _identity(info: DatasetInfo, model: str, model_args: dict, settings: ExpertSettings, seed: int,
              num_experts: int, val_per_class: int, strategy: str, precision: str) -> dict[str, Any]:
    """Everything that defines an expert set (what a resume must agree with)."""
    return {
        "dataset": info.to_dict(),
        "normalisation": {"mean": list(info.mean), "std": list(info.std)},
        "zca": settings.zca,
        "model": model,
        "model_args": model_args,
        "optimizer": {"name": "sgd", "lr": settings.lr, "momentum": 0.0, "weight_decay": settings.weight_decay,
                      "batch_size": settings.batch_size, "lr_decay": settings.lr_decay,
                      "first_decayed_epoch": settings.first_decayed_epoch, "lr_decay_factor": 0.1},
        "augment": {"dsa_strategy": strategy},
        "precision": precision,
        "seed": seed,
        "epochs": settings.epochs,
        "num_experts": num_experts,
        "members": settings.members,
        "validation": {"per_class": val_per_class, "split": "held out of the training split",
                       "seed": sub_seed(seed, "validation")},
        # only with a curriculum, so plain sets (and their resumes) stay as they were
        **({"curriculum": settings.curriculum.describe(settings.epochs, seed)} if settings.curriculum else {}),
    }


def _check_resume(path: Path, old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> None:
    for key, value in new.items():
        have = old.get(key, "<missing>")
        if isinstance(value, dict) and isinstance(have, dict):
            _check_resume(path, have, value, f"{prefix}{key}.")
        elif have != value:
            raise ConfigError(f"--resume: {path} was made with {prefix}{key}={have!r}, this run asks for "
                              f"{value!r}; resume with the same settings or choose another --out")


def _save_shard(out: Path, chunk: int, epoch: int, experts: Sequence[int], model: TinyNet,
                gen: torch.Generator) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for m, i in enumerate(experts):
        single = extract_member(model, m)
        for key, t in single.state_dict().items():
            # a clone: the stored snapshot never shares memory with the live weights
            tensors[f"expert.{i}.{key}"] = t.detach().to("cpu", copy=True).contiguous()
    tensors["rng.generator"] = gen.get_state().clone()
    header = {"format": SHARD_FORMAT, "format_version": FORMAT_VERSION, "chunk": chunk, "epoch": epoch,
              "experts": list(experts)}
    path = out / shard_name(chunk, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"tinyset": json.dumps(header)})


def _read_shard(path: Path, keys: Sequence[str] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (all, or only ``keys``) and header of one shard, checked; never unpickles."""
    if not path.is_file():
        raise ArtifactError(f"{path}: missing expert shard (the manifest lists this epoch as completed)")
    return read_tagged_safetensors(path, SHARD_FORMAT, FORMAT_VERSION, "expert shard", keys)


def train_experts(train: ImageDataset, out_dir: str | Path, num_experts: int, model: str = "convnet",
                  settings: ExpertSettings | None = None, seed: int = 0, device: str | torch.device = "cpu",
                  resume: bool = False, model_args: Mapping[str, Any] | None = None,
                  progress: ProgressHook | None = None) -> "ExpertSet":
    """Train ``num_experts`` networks on ``train`` and store their trajectories in ``out_dir``.

    See the module docstring for the training and the folder layout. ``model_args`` are passed to
    :func:`tinyset.models.create_model` (e.g. ``{"width": 16}``) and recorded. ``resume=True``
    continues an interrupted set (every setting must be the same; a :class:`ConfigError` names the
    first that differs). Returns the :class:`ExpertSet`.
    """
    settings = settings or ExpertSettings()
    num_experts = check_number("experts", "num_experts", num_experts, low=1, high=100_000, integer=True)
    device = torch.device(device)
    out = Path(out_dir)
    key = MODELS._key(model)
    MODELS.get(key)  # unknown names: ConfigError listing the known ones
    info = train.info
    probe = create_model(key, info.channels, info.num_classes, info.image_size, members=1,
                         generator=make_generator(0), **dict(model_args or {}))
    spec = probe.spec()
    spec.pop("name")
    manifest_path = out / MANIFEST
    if resume and not manifest_path.is_file():
        raise ArtifactError(f"--resume: no expert set at {out} ({MANIFEST} is missing); start without --resume")
    if not resume and manifest_path.exists():
        raise ConfigError(f"{out} already holds an expert set ({manifest_path}); pass --resume to continue it "
                          f"or choose another --out")
    val_per_class = settings.val_per_class or default_val_per_class(train)
    strategy = settings.dsa_strategy or default_strategy(info.name)
    augment = DSA(strategy) if strategy != "none" else None
    precision = resolve_precision(settings.precision, device)
    identity = _identity(info, key, spec, settings, seed, num_experts, val_per_class,
                         augment.strategy if augment else "none", precision)

    fit, val = split_validation(train, val_per_class, make_generator(sub_seed(seed, "validation")))
    x, y = fit.normalized(device), fit.labels.to(device)
    val_x, val_y = val.normalized(device), val.labels.to(device)
    zca = Zca.fit(x) if settings.zca else None  # deterministic: a resume fits the same transform
    if zca is not None:
        x, val_x = zca.whiten(x, inplace=True), zca.whiten(val_x, inplace=True)
    m_width = settings.members
    chunks = [list(range(s, min(s + m_width, num_experts))) for s in range(0, num_experts, m_width)]
    steps_per_epoch = -(-len(fit) // min(settings.batch_size, len(fit)))
    compile_ = settings.compile if settings.compile is not None else (
        device.type == "cpu" and steps_per_epoch * settings.epochs >= COMPILE_MIN_STEPS)

    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        clean_stale_temps(out)
        for c in range(len(chunks)):
            if (out / f"chunk_{c:04d}").is_dir():
                clean_stale_temps(out / f"chunk_{c:04d}")
        if resume:
            manifest = _read_manifest(manifest_path)
            _check_resume(manifest_path, manifest, identity)
        else:
            manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **identity,
                        "train_images": len(fit), "val_images": len(val), "layout": shard_name(0, 0),
                        "experts": [{"index": i, "chunk": c, "init_seed": sub_seed(seed, "init", i),
                                     "completed_epoch": -1, "train_loss": [], "val_acc": []}
                                    for c, ch in enumerate(chunks) for i in ch],
                        "wall_time_s": 0.0, "tinyset_version": __version__}
            write_json(manifest_path, manifest)
        if zca is not None:
            zca.save(out / ZCA_FILE)
        order = None
        if settings.curriculum is not None:
            order = settings.curriculum.prepare(fit, out, key, dict(model_args or {}), seed, device, precision)
            manifest["curriculum_sizes"] = [int(settings.curriculum.subset(e, order, settings.epochs).numel())
                                            for e in range(settings.epochs)]
        records = manifest["experts"]
        total = num_experts * settings.epochs
        done = float(sum(max(0, r["completed_epoch"]) for r in records))
        t0, wall0 = time.perf_counter(), float(manifest.get("wall_time_s", 0.0))

        for c, members in enumerate(chunks):
            recs = [records[i] for i in members]
            start = min(r["completed_epoch"] for r in recs)
            if start >= settings.epochs:
                continue
            gen = make_generator(sub_seed(seed, "chunk", c))
            if start < 0:  # fresh chunk: every expert from its own init seed
                nets = [create_model(key, info.channels, info.num_classes, info.image_size, members=1,
                                     generator=make_generator(r["init_seed"]), **dict(model_args or {}))
                        for r in recs]
                net = stack_members(nets).to(device) if len(nets) > 1 else nets[0].to(device)
                accs = test_accuracy(net, val_x, val_y, precision=precision, compile=compile_)
                _save_shard(out, c, 0, members, net, gen)
                for r, a in zip(recs, accs):
                    r.update(completed_epoch=0, val_acc=[a], train_loss=[None])
                manifest["wall_time_s"] = wall0 + time.perf_counter() - t0
                write_json(manifest_path, manifest)
                start = 0
            else:  # resume from the last completed epoch of this chunk
                tensors, _ = _read_shard(out / shard_name(c, start))
                nets = []
                for i in members:
                    single = create_model(key, info.channels, info.num_classes, info.image_size, members=1,
                                          generator=make_generator(0), **dict(model_args or {}))
                    prefix = f"expert.{i}."
                    try:
                        single.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                                if k.startswith(prefix)})
                    except RuntimeError as exc:
                        raise ArtifactError(f"{out / shard_name(c, start)}: expert {i} does not fit "
                                            f"{key} ({exc})") from None
                    nets.append(single)
                net = stack_members(nets).to(device) if len(nets) > 1 else nets[0].to(device)
                gen.set_state(tensors["rng.generator"])
                for r in recs:  # a chunk's experts advance together; drop anything past `start`
                    r.update(completed_epoch=start, val_acc=r["val_acc"][:start + 1],
                             train_loss=r["train_loss"][:start + 1])
            for ep in range(start, settings.epochs):
                ts = TrainSettings(epochs=1, lr=settings.lr_at(ep), momentum=0.0, weight_decay=settings.weight_decay,
                                   batch_size=settings.batch_size, lr_decay_factor=1.0, precision=precision,
                                   compile=compile_)
                losses: list[float] = []
                step_cb = None
                if progress is not None:
                    base = done
                    step_cb = (lambda _e, k, n, _b=base, _w=len(members):  # noqa: E731
                               progress(_b + _w * k / n, total, {"kind": "step", "chunk": c, "epoch": ep + 1}))
                ex, ey = (x, y) if order is None else _rows(x, y, settings.curriculum.subset(ep, order,
                                                                                     settings.epochs))
                member_loss = torch.zeros(len(members), dtype=torch.float64)  # each expert's own loss sum
                member_rows = [0]

                def count(_e, _i, batch_losses, _o, _sum=member_loss, _rows=member_rows):
                    per = batch_losses.double().view(len(_sum), -1)  # member-major
                    _sum += per.sum(dim=1)
                    _rows[0] += per.shape[1]

                train_ensemble(net, ex, ey, ts, gen, augment, on_epoch=lambda _e, loss, _a: losses.append(loss),
                               on_step=step_cb, on_batch=count)
                accs = test_accuracy(net, val_x, val_y, precision=precision, compile=compile_)
                _save_shard(out, c, ep + 1, members, net, gen)
                for j, (r, a) in enumerate(zip(recs, accs)):
                    r["completed_epoch"] = ep + 1
                    r["val_acc"].append(a)
                    r["train_loss"].append(float(member_loss[j]) / max(member_rows[0], 1))
                manifest["wall_time_s"] = wall0 + time.perf_counter() - t0
                write_json(manifest_path, manifest)
                done += len(members)
                if progress is not None:
                    progress(done, total, {"kind": "epoch", "chunk": c, "epoch": ep + 1, "loss": losses[0],
                                           "val_acc": sum(accs) / len(accs)})
    return ExpertSet(out)


# ---------------------------------------------------------------------------------- reading
def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no such file; expected the {MANIFEST} of an expert set made by "
                            f"`tinyset experts`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: not a readable expert-set manifest ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise ArtifactError(f"{path}: not a tinyset expert set (format {found!r}, expected {FORMAT!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: expert-set format version {data.get('format_version')!r}; this tinyset "
                            f"reads version {FORMAT_VERSION}")
    expect = {"dataset": dict, "model": str, "model_args": dict, "zca": bool, "epochs": int, "experts": list,
              "normalisation": dict, "optimizer": dict, "seed": int, "num_experts": int}
    for key, typ in expect.items():
        v = data.get(key)
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise ArtifactError(f"{path}: field {key!r} is missing or of the wrong type "
                                f"({type(v).__name__}, expected {typ.__name__})")
    for k, r in enumerate(data["experts"]):
        if (not isinstance(r, dict) or r.get("index") != k or not isinstance(r.get("chunk"), int)
                or not isinstance(r.get("completed_epoch"), int) or not isinstance(r.get("val_acc"), list)):
            raise ArtifactError(f"{path}: expert record {k} is malformed ({r!r:.120})")
    return data


class ExpertSet:
    """An expert folder made by :func:`train_experts`, read lazily.

    Opening it reads only ``manifest.json``. Parameters are read on demand, one (expert, epoch) at a
    time, from that epoch's shard (safetensors reads just the requested tensors), so a trajectory
    streams without loading any other expert or epoch.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ArtifactError(f"{self.path}: no such folder; expected an expert set made by `tinyset experts`")
        self.manifest = _read_manifest(self.path / MANIFEST)
        m = self.manifest
        try:
            self.info = DatasetInfo.from_dict(m["dataset"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ArtifactError(f"{self.path / MANIFEST}: invalid dataset description ({exc})") from None
        self.model: str = m["model"]
        self.model_args: dict[str, Any] = dict(m["model_args"])
        self.zca: bool = m["zca"]
        self.epochs: int = m["epochs"]
        self.num_experts: int = m["num_experts"]
        self._names: list[str] | None = None
        self._shapes: dict[str, tuple[int, ...]] | None = None

    def __repr__(self) -> str:
        return (f"ExpertSet({str(self.path)!r}, {self.info.name}, {self.model}, "
                f"{len(self.complete())}/{self.num_experts} experts x {self.epochs} epochs)")

    # ------------------------------------------------------------------ description
    def complete(self) -> list[int]:
        """Indices of the experts whose every epoch is stored."""
        return [r["index"] for r in self.manifest["experts"] if r["completed_epoch"] >= self.epochs]

    def completed_epoch(self, i: int) -> int:
        return self._record(i)["completed_epoch"]

    def val_acc(self, i: int) -> list[float]:
        """Validation accuracy of expert ``i`` after epochs 0, 1, ... (epoch 0: at initialisation)."""
        return list(self._record(i)["val_acc"])

    def zca_transform(self) -> Zca | None:
        """The ZCA whitening the experts trained in (``zca.safetensors``), or ``None`` without ZCA."""
        if not self.zca:
            return None
        h, w = self.info.image_size
        return Zca.load(self.path / ZCA_FILE, dim=self.info.channels * h * w)

    def build_model(self, device: str | torch.device = "cpu", members: int = 1) -> TinyNet:
        """A network of the experts' architecture (throwaway weights)."""
        args = dict(self.model_args)
        return create_model(self.model, members=members, generator=make_generator(0), device=device, **args)

    def param_names(self) -> list[str]:
        """Parameter names in the order of the flat vectors (``named_parameters`` of the model)."""
        if self._names is None:
            net = self.build_model()
            self._names = [n for n, _ in net.named_parameters()]
            self._shapes = {n: tuple(p.shape) for n, p in net.named_parameters()}
        return list(self._names)

    def num_params(self) -> int:
        self.param_names()
        assert self._shapes is not None
        return sum(math.prod(s) for s in self._shapes.values())

    # ------------------------------------------------------------------ loading
    def _record(self, i: int) -> dict[str, Any]:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(self.manifest["experts"]):
            raise ConfigError(f"expert index {i!r} out of range: {self.path} has experts 0.."
                              f"{len(self.manifest['experts']) - 1}")
        return self.manifest["experts"][i]

    def shard_path(self, i: int, t: int) -> Path:
        r = self._record(i)
        if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t <= r["completed_epoch"]:
            raise ConfigError(f"epoch {t!r} of expert {i} is not stored in {self.path}: it has epochs 0.."
                              f"{r['completed_epoch']}" + (" (none yet)" if r["completed_epoch"] < 0 else ""))
        return self.path / shard_name(r["chunk"], t)

    def epoch_state(self, i: int, t: int) -> dict[str, torch.Tensor]:
        """Expert ``i``'s whole state (parameters and buffers) after ``t`` epochs."""
        path = self.shard_path(i, t)
        prefix = f"expert.{i}."
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                keys = [k for k in f.keys() if k.startswith(prefix)]
        except Exception as exc:
            raise ArtifactError(f"{path}: not a readable expert shard ({type(exc).__name__}: {exc})") from None
        tensors, header = _read_shard(path, keys)
        if header.get("epoch") != t or i not in header.get("experts", []):
            raise ArtifactError(f"{path}: header says epoch {header.get('epoch')!r}, experts "
                                f"{header.get('experts')!r}; expected epoch {t} of expert {i}")
        return {k[len(prefix):]: v for k, v in tensors.items()}

    def epoch_params(self, i: int, t: int) -> dict[str, torch.Tensor]:
        """Expert ``i``'s parameters after ``t`` epochs, by name (loads only these tensors)."""
        names = self.param_names()
        assert self._shapes is not None
        path = self.shard_path(i, t)
        tensors, header = _read_shard(path, [f"expert.{i}.{n}" for n in names])
        if header.get("epoch") != t:
            raise ArtifactError(f"{path}: header says epoch {header.get('epoch')!r}, expected {t}")
        out = {}
        for n in names:
            v = tensors[f"expert.{i}.{n}"]
            if tuple(v.shape) != self._shapes[n]:
                raise ArtifactError(f"{path}: expert {i} parameter {n!r} has shape {tuple(v.shape)}, "
                                    f"{self.model} has {self._shapes[n]}")
            out[n] = v
        return out

    def flat_params(self, i: int, t: int, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Expert ``i``'s parameters after ``t`` epochs as one flat vector (``param_names`` order)."""
        p = self.epoch_params(i, t)
        return torch.cat([p[n].reshape(-1) for n in self.param_names()]).to(device, dtype)

    def trajectory(self, i: int) -> Iterator[dict[str, torch.Tensor]]:
        """Expert ``i``'s parameters after epochs 0, 1, ..., read one epoch at a time."""
        for t in range(self.completed_epoch(i) + 1):
            yield self.epoch_params(i, t)

    def load_model(self, i: int, t: int, device: str | torch.device = "cpu") -> TinyNet:
        """Expert ``i`` after ``t`` epochs as a ready network."""
        net = self.build_model()
        net.load_state_dict(self.epoch_state(i, t))
        return net.to(device)


def _same_floats(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-9)
                                    for x, y in zip(a, b))


def check_compatible(experts: ExpertSet, info: DatasetInfo, model: str, zca: bool = False) -> None:
    """Refuse an expert set that does not fit a distillation run; the message names both values."""
    where = f"expert set {experts.path}"
    e = experts.info
    if e.name != info.name:
        raise ConfigError(f"{where} was trained on dataset {e.name!r}; this run distils {info.name!r}")
    if (e.channels, tuple(e.image_size), e.num_classes) != (info.channels, tuple(info.image_size), info.num_classes):
        raise ConfigError(f"{where} was trained on {e.channels}x{e.image_size[0]}x{e.image_size[1]} images of "
                          f"{e.num_classes} classes; this run has {info.channels}x{info.image_size[0]}x"
                          f"{info.image_size[1]} images of {info.num_classes} classes")
    if not (_same_floats(e.mean, info.mean) and _same_floats(e.std, info.std)):
        raise ConfigError(f"{where} was trained with normalisation mean {list(e.mean)} std {list(e.std)}; "
                          f"this run uses mean {list(info.mean)} std {list(info.std)}")
    key = MODELS._key(model)
    if experts.model != key:
        raise ConfigError(f"{where} holds {experts.model!r} networks; this run matches with model={key!r} "
                          f"(set model={experts.model} or train experts of {key})")
    if bool(experts.zca) != bool(zca):
        raise ConfigError(f"{where} was trained with zca={experts.zca}; this run uses zca={zca} (set "
                          f"zca={str(experts.zca).lower()} or train experts {'with' if zca else 'without'} --zca)")


# ---------------------------------------------------------------------------------- data-selection curriculum (PAD)
#: the difficulty scores of a curriculum expert set (EL2N of every training image, validation split excluded)
DIFFICULTY_FILE = "difficulty.safetensors"


def _rows(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    idx = idx.to(x.device)
    return x.index_select(0, idx), y.index_select(0, idx)


@dataclass
class Curriculum:
    """PAD's data selection for expert trajectories (Li et al. 2024, upstream ``buffer/buffer_CL.py``).

    The training images of every class are ordered from easy to hard by a difficulty score (EL2N,
    :func:`tinyset.select.el2n.el2n_scores`, of ``el2n_members`` networks of the experts'
    architecture trained ``el2n_epochs`` epochs; upstream loads a precomputed GraNd ordering). For
    0-based training epoch ``e``, class ``c`` with ``n_c`` images trains on:

    * ``e <= add_end_epoch``: its ``floor(p * n_c)`` easiest images, ``p = min(1, init_ratio +
      (1 - init_ratio) * e / add_end_epoch)`` (harder images are added linearly);
    * ``add_end_epoch < e <= rm_epoch_first``: all of them;
    * ``rm_epoch_first < e <= rm_epoch_second``: all but its ``floor(rm_easy_ratio_first * n_c)`` easiest;
    * later: all but its ``floor(rm_easy_ratio_second * n_c)`` easiest.

    At least one image per class is kept. Ratios and epochs default to upstream's README command
    (``--init_ratio 0.75 --add_end_epoch 20 --rm_epoch_first 40 --rm_epoch_second 60
    --rm_easy_ratio_first 0.1 --rm_easy_ratio_second 0.2`` for 100 epochs); epochs left ``None``
    are those values scaled to the run's length (20%, 40%, 60% of the epochs, rounded).
    """

    init_ratio: float = 0.75
    add_end_epoch: int | None = None
    rm_epoch_first: int | None = None
    rm_epoch_second: int | None = None
    rm_easy_ratio_first: float = 0.1
    rm_easy_ratio_second: float = 0.2
    el2n_epochs: int = 3
    el2n_members: int = 4

    def __post_init__(self) -> None:
        own = "curriculum"
        self.init_ratio = check_number(own, "init_ratio", self.init_ratio, low=0, high=1, low_open=True)
        for name in ("rm_easy_ratio_first", "rm_easy_ratio_second"):
            setattr(self, name, check_number(own, name, getattr(self, name), low=0, high=1, high_open=True))
        for name in ("add_end_epoch", "rm_epoch_first", "rm_epoch_second"):
            if getattr(self, name) is not None:
                setattr(self, name, check_number(own, name, getattr(self, name), low=1, high=100_000, integer=True))
        self.el2n_epochs = check_number(own, "el2n_epochs", self.el2n_epochs, low=1, high=1000, integer=True)
        self.el2n_members = check_number(own, "el2n_members", self.el2n_members, low=1, high=64, integer=True)

    def epochs_for(self, epochs: int) -> tuple[int, int, int]:
        """``(add_end_epoch, rm_epoch_first, rm_epoch_second)`` for a run of ``epochs`` epochs, checked."""
        add = self.add_end_epoch if self.add_end_epoch is not None else max(1, round(0.2 * epochs))
        first = self.rm_epoch_first if self.rm_epoch_first is not None else max(add, round(0.4 * epochs))
        second = self.rm_epoch_second if self.rm_epoch_second is not None else max(first, round(0.6 * epochs))
        if not add <= first <= second:
            raise ConfigError(f"curriculum epochs must satisfy add_end_epoch <= rm_epoch_first <= rm_epoch_second, "
                              f"got {add}, {first}, {second}")
        return add, first, second

    def ratio(self, epoch: int, epochs: int) -> tuple[str, float]:
        """``("keep", p)``: the easiest share ``p`` of every class; ``("drop", r)``: all but the easiest ``r``."""
        add, first, second = self.epochs_for(epochs)
        if epoch <= add:
            return "keep", min(1.0, self.init_ratio + (1 - self.init_ratio) * epoch / add)
        if epoch <= first:
            return "keep", 1.0
        return "drop", self.rm_easy_ratio_first if epoch <= second else self.rm_easy_ratio_second

    def subset(self, epoch: int, order: Sequence[torch.Tensor], epochs: int) -> torch.Tensor:
        """Sorted indices of the images 0-based epoch ``epoch`` of a run of ``epochs`` epochs trains on;
        ``order``: per class, easy to hard (:func:`tinyset.select.el2n.easy_to_hard`)."""
        kind, r = self.ratio(epoch, epochs)
        picks = []
        for idx in order:
            n = idx.numel()
            if kind == "keep":
                picks.append(idx[:max(1, min(n, int(r * n)))])
            else:
                picks.append(idx[min(n - 1, int(r * n)):])
        return torch.cat(picks).sort().values

    def describe(self, epochs: int, seed: int) -> dict[str, Any]:
        """The schedule and the scores' provenance, as recorded in the manifest."""
        add, first, second = self.epochs_for(epochs)
        return {"source": "PAD (Li et al. 2024), NUS-HPC-AI-Lab/PAD buffer/buffer_CL.py",
                "init_ratio": self.init_ratio, "add_end_epoch": add, "rm_epoch_first": first,
                "rm_epoch_second": second, "rm_easy_ratio_first": self.rm_easy_ratio_first,
                "rm_easy_ratio_second": self.rm_easy_ratio_second,
                "scores": {"method": "el2n", "paper": "Paul et al. 2021 (EL2N, early in training)",
                           "file": DIFFICULTY_FILE, "members": self.el2n_members, "epochs": self.el2n_epochs,
                           "optimizer": "sgd lr 0.01 momentum 0.9 weight decay 5e-4, batch 256, no augmentation",
                           "data": "the training split minus the validation split, normalised (never whitened)",
                           "seed": sub_seed(seed, "el2n")}}

    def prepare(self, fit: ImageDataset, out: Path, model: str, model_args: Mapping[str, Any], seed: int,
                device: torch.device, precision: str) -> list[torch.Tensor]:
        """The per-class easy-to-hard order of ``fit``: EL2N scores read from ``out/difficulty.safetensors``
        when present (a resume), else computed (seeded) and written there."""
        from tinyset.select.el2n import easy_to_hard, el2n_scores

        path = out / DIFFICULTY_FILE
        if path.is_file():
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    scores = f.get_tensor("scores")
            except Exception as exc:
                raise ArtifactError(f"{path}: not a readable difficulty file ({type(exc).__name__}: {exc})") from None
            if tuple(scores.shape) != (len(fit),):
                raise ArtifactError(f"{path}: {tuple(scores.shape)} scores, the training split has {len(fit)} images")
        else:
            scores = el2n_scores(fit, make_generator(sub_seed(seed, "el2n")), device, model=model,
                                 members=self.el2n_members, epochs=self.el2n_epochs, precision=precision,
                                 model_args=model_args)
            with atomic_path(path) as tmp:
                save_file({"scores": scores.contiguous(), "labels": fit.labels.cpu().contiguous()}, str(tmp),
                          metadata={"tinyset": json.dumps({"format": "tinyset.difficulty", "method": "el2n",
                                                           "higher": "harder"})})
        return easy_to_hard(scores, fit.labels, fit.info.num_classes)


__all__ = ["ExpertSet", "ExpertSettings", "Curriculum", "train_experts", "check_compatible", "sub_seed", "shard_name",
           "default_val_per_class", "MANIFEST", "ZCA_FILE", "DIFFICULTY_FILE", "FORMAT", "SHARD_FORMAT",
           "FORMAT_VERSION"]
