"""The distiller contract: what every distillation method declares and implements.

A method is one class, registered in :data:`tinyset.methods.METHODS`, that

* names its typed configuration (``Config``, a :class:`DistillConfig` subclass), its published
  settings (``paper``, a :class:`~tinyset.hparams.Table`) and its ``cpu`` profile (``cpu_rule``);
* declares, in :meth:`Distiller.setup`, **all of its learnable state by name**: tensors
  (:meth:`~Distiller.learnable`; the synthetic ``images`` always, optionally soft labels, a learning
  rate, ...), modules whose parameters it trains (:meth:`~Distiller.module`) and one optimiser per
  group of them (:meth:`~Distiller.optimizer`, each with its own settings from the config);
* implements one outer iteration (:meth:`Distiller.step`) and, when it learns more than images and
  hard labels, how its state becomes a synthetic set (:meth:`Distiller.to_synset`);
* optionally reports extra numbers per step (:meth:`Distiller.metrics`) and writes its own files in the
  run folder (:meth:`Distiller.write_artifacts`, e.g. a generator and sample grids).

The initial images come from the ``init`` setting, one of the sources registered in :data:`INITS`
(``real``, ``noise``, ``file:PATH`` here; other modules add theirs, e.g. a generator file), so every
method can start from any of them and no method is named here.

The loop (:mod:`tinyset.methods.loop`) knows nothing else about a method: it checkpoints and
restores every declared tensor, module and optimiser state together with the random generator, so
``--resume`` is bit-exact on CPU for every method.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from tinyset.augment import DSA
from tinyset.data.base import DatasetInfo, RealPool
from tinyset.data.zca import Zca
from tinyset.errors import ArtifactError, ConfigError, NumericalError
from tinyset.hparams import HParams, Row, Rule, Table, hp
from tinyset.registry import Registry
from tinyset.runtime import forward_chunk


#: help of the ``init`` setting (checked by :func:`check_init` against the registry :data:`INITS`)
INIT_HELP = ("initial synthetic images: real (random real images of the class), noise (Gaussian), file:PATH (the "
             "first ipc per class of a synthetic-set file) or another registered source (`tinyset distill --help` "
             "lists them)")


@dataclass
class DistillConfig(HParams):
    """Settings every distillation method has. Methods add their own fields in a subclass."""

    iterations: int = hp(1000, "outer iterations", ge=1)
    model: str = hp("convnet", "network the method matches with (see `tinyset models`)")
    init: str = hp("real", INIT_HELP)
    lr_img: float = hp(1.0, "learning rate of the synthetic images", gt=0)
    momentum_img: float = hp(0.5, "SGD momentum of the synthetic images", ge=0, lt=1)
    batch_real: int = hp(256, "real images per class per iteration", ge=1, le=65536)
    dsa_strategy: str | None = hp(None, "DSA transformations ('none': off; none: the dataset's default)",
                                  optional=True)
    final_eval: str = hp("dsa", "protocol of the test evaluation after the run (see `tinyset evaluate --help`)",
                         choices=("quick", "dsa", "noaug"))
    zca: bool = hp(False, "distil on ZCA-whitened real images (fitted on the run's training images, eps 0.1 as "
                          "in MTT); the set stores the transform and evaluation whitens the test images with it")


@dataclass
class DistillContext:
    """What a method is given: the dataset's description, the real images, ipc, device, precision,
    the augmentation (``None`` when off) and the ZCA whitening already applied to ``pool``
    (``None``: not whitened; see :func:`whiten_pool`)."""

    info: DatasetInfo
    pool: RealPool
    ipc: int
    device: torch.device
    precision: str
    augment: DSA | None
    zca: Zca | None = None


def whiten_pool(ctx: DistillContext) -> Zca:
    """ZCA-whiten ``ctx.pool`` in place (no second copy of the real images) with a transform fitted
    on its images, record it as ``ctx.zca`` and return it; a context already whitened keeps its
    transform (whitening twice would be wrong)."""
    if ctx.zca is None:
        ctx.zca = Zca.fit(ctx.pool.images)
        ctx.zca.whiten(ctx.pool.images, inplace=True)
    return ctx.zca


class Distiller:
    """Base class of the distillation methods (see the module docstring)."""

    #: registry name (set by the subclass)
    name: ClassVar[str] = "base"
    Config: ClassVar[type[DistillConfig]] = DistillConfig
    paper: ClassVar[Table] = Table(())
    cpu_rule: ClassVar[Rule | None] = None
    #: whether the method augments its matching batches with DSA (``dsa_strategy`` decides which)
    uses_dsa: ClassVar[bool] = True
    #: which expert sets (``tinyset experts``) the method distils from: ``"plain"``, ``"curriculum"`` (made
    #: with ``--curriculum``) or ``None`` (none); ``tinyset experts`` names the matching methods in its hint
    expert_kind: ClassVar[str | None] = None
    #: what ``--precision auto`` runs for this method whatever the CPU (``None``: the runtime's rule, bf16
    #: where the CPU has native bf16); an explicit ``--precision`` always wins
    auto_precision: ClassVar[str | None] = None
    #: ``complete(values, dataset, ipc) -> {field: (value, why)}`` fills fields no layer set
    complete: ClassVar[Callable[[dict, str, int], dict[str, tuple[Any, str]]] | None] = None

    @classmethod
    def augments(cls, cfg: DistillConfig) -> bool:
        """Whether a run with ``cfg`` is given a DSA object as ``ctx.augment`` (``dsa_strategy`` decides
        its transformations); ``uses_dsa`` unless a method makes it a setting."""
        return cls.uses_dsa

    def __init__(self, cfg: DistillConfig, ctx: DistillContext):
        self.cfg = cfg
        self.ctx = ctx
        self.info, self.pool, self.ipc = ctx.info, ctx.pool, ctx.ipc
        self.device, self.precision, self.augment = ctx.device, ctx.precision, ctx.augment
        self.tensors: dict[str, torch.Tensor] = {}
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        if not cfg.zca and ctx.zca is not None:
            raise ConfigError("the real pool of this context is ZCA-whitened but the run has zca=false")
        #: the run's ZCA whitening (``zca=true``): the pool and the synthetic images live in its space
        self.zca: Zca | None = whiten_pool(ctx) if cfg.zca else None

    # ------------------------------------------------------------------ declarations
    def learnable(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Declare a learnable tensor (a leaf that requires grad); returns it."""
        if name in self.tensors:
            raise ValueError(f"{self.name}: tensor {name!r} is declared twice")
        t = value.detach().clone().to(self.device).requires_grad_(True)
        self.tensors[name] = t
        return t

    def module(self, name: str, net: nn.Module) -> nn.Module:
        """Declare a module whose whole state (parameters and buffers) is checkpointed."""
        if name in self.modules:
            raise ValueError(f"{self.name}: module {name!r} is declared twice")
        self.modules[name] = net
        return net

    def optimizer(self, name: str, opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Declare an optimiser over declared tensors or module parameters."""
        if name in self.optimizers:
            raise ValueError(f"{self.name}: optimiser {name!r} is declared twice")
        self.optimizers[name] = opt
        return opt

    # ------------------------------------------------------------------ what a method implements
    def setup(self, gen: torch.Generator) -> None:
        """Declare the learnable state. The default: synthetic images (``init``) and one SGD optimiser
        (``lr_img``, ``momentum_img``) over them."""
        images = self.learnable("images", self.initial_images(gen))
        self.optimizer("images", torch.optim.SGD([images], lr=self.cfg.lr_img, momentum=self.cfg.momentum_img))

    def step(self, gen: torch.Generator) -> float:
        """One outer iteration: update the declared state, return the loss (mean per class)."""
        raise NotImplementedError

    def to_synset(self, meta: dict[str, Any]) -> Any:
        """The synthetic set this state stands for. The default: the ``images`` with hard labels,
        class by class, a learned ``lr`` when one is declared and the run's ZCA transform."""
        from tinyset.synset import SyntheticSet

        lr = self.tensors.get("lr")
        return SyntheticSet(self.tensors["images"].detach().cpu(), self.hard_labels(), self.info,
                            lr=float(lr.detach()) if lr is not None else None, meta=meta, zca=self.zca)

    def synset(self, meta: dict[str, Any]) -> Any:
        """What the loop saves and evaluates: :meth:`to_synset`, carrying the run's ZCA transform
        even when a method's own ``to_synset`` leaves it out (its images are whitened all the same)."""
        import dataclasses

        synset = self.to_synset(meta)
        if self.zca is not None and synset.zca is None:
            synset = dataclasses.replace(synset, zca=self.zca)
        return synset

    def metrics(self) -> dict[str, float]:
        """Extra numbers of the last :meth:`step` (e.g. the losses of two networks), recorded under
        ``"metrics"`` in the run's ``metrics.jsonl``. The default: none."""
        return {}

    def write_artifacts(self, out_dir: Path, iteration: int, final: bool) -> None:
        """Write the method's own files in the run folder (e.g. a generator and sample grids). The loop
        calls it after every iteration (after that iteration's checkpoint, if any) and once more with
        ``final=True`` after ``synset.safetensors``; the method decides how often it writes. It must not
        draw from the run's generator or change the declared state (resume stays bit-exact). The
        default: nothing."""

    # ------------------------------------------------------------------ shared pieces
    @property
    def images(self) -> torch.Tensor:
        return self.tensors["images"]

    def hard_labels(self) -> torch.Tensor:
        """``ipc`` images per class, class by class."""
        return torch.arange(self.info.num_classes).repeat_interleave(self.ipc)

    def initial_images(self, gen: torch.Generator) -> torch.Tensor:
        """``ipc`` images per class, class by class, from the ``init`` source (see :data:`INITS`)."""
        name, argument = parse_init(self.cfg.init)
        images = INITS.get(name).make(self, argument, gen)
        k, (c, (h, w)) = self.info.num_classes, (self.info.channels, self.info.image_size)
        if tuple(images.shape) != (k * self.ipc, c, h, w):  # a source's own bug, not bad input
            raise RuntimeError(f"init={self.cfg.init!r} made images of shape {tuple(images.shape)}, expected "
                               f"{(k * self.ipc, c, h, w)}")
        return images.to(self.device)

    def siamese(self, real: torch.Tensor, syn: torch.Tensor, gen: torch.Generator,
                real_groups: torch.Tensor, syn_groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment real and synthetic images so that equal group ids share one transformation.

        The real images are augmented without autograd; gradients flow to ``syn`` only.
        """
        if not self.augment:
            return real, syn
        groups = torch.cat([real_groups, syn_groups])
        prm = self.augment.sample(len(groups), self.info.image_size, gen, op_groups=groups, param_groups=groups)
        n = real.shape[0]
        with torch.no_grad():
            real = self.augment.apply(real, prm.rows(0, n))
        return real, self.augment.apply(syn, prm.rows(n, len(groups)))

    def frozen_network(self) -> nn.Module:
        """The ``model`` network with frozen weights in train mode (BatchNorm uses batch statistics, as
        the references do); methods that draw a fresh network every iteration re-initialise it in place
        (:func:`tinyset.models.layers.init_parameters`) so a compiled forward is reused."""
        from tinyset.models import create_model

        info = self.info
        net = create_model(self.cfg.model, info.channels, info.num_classes, info.image_size, device=self.device)
        net.requires_grad_(False)
        net.train()
        return net

    def forward_real(self, fn: Callable[[torch.Tensor], Any], x: torch.Tensor, net: nn.Module) -> Any:
        """``fn(x)`` for a large batch without autograd, computed a chunk of images at a time where that
        is the same function and faster (:func:`tinyset.runtime.forward_chunk`: on a CPU, for networks
        without BatchNorm). ``fn`` returns a tensor or a (nested) tuple/list of tensors with the
        images along dimension 0; the chunks' outputs are concatenated."""
        from tinyset.models.layers import mixes_images

        n = forward_chunk(self.device)
        if n is None or len(x) <= n or mixes_images(net):
            return fn(x)
        return _concat([fn(chunk) for chunk in x.split(n)])

    def compile_wanted(self, auto: bool) -> bool:
        """The ``compile`` setting (auto/on/off) resolved, ``auto`` being the method's own rule."""
        mode = getattr(self.cfg, "compile", "off")
        return auto if mode == "auto" else mode == "on"

    @staticmethod
    def check_finite(loss: torch.Tensor) -> None:
        if not bool(torch.isfinite(loss)):
            raise NumericalError(f"the matching loss is {float(loss)}; stopping before the state is updated")

    def update(self, name: str, loss: torch.Tensor) -> None:
        """Zero the optimiser ``name``'s gradients, backpropagate ``loss`` (checked finite), step."""
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        self.check_finite(loss)
        opt.step()

    @classmethod
    def check_config(cls, cfg: DistillConfig) -> None:
        """Checks across fields or against registries (the ranges of single fields are in ``Config``)."""
        from tinyset.models import MODELS

        if cfg.model not in MODELS:
            raise ConfigError(f"model={cfg.model!r} is not a registered architecture; known: "
                              f"{', '.join(MODELS.names())}")


# ---------------------------------------------------------------------------------- initialisation sources
def _concat(outs: list[Any]) -> Any:
    """Concatenate per-chunk outputs (tensors, or equally shaped nested tuples/lists of them)."""
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outs)
    return type(first)(_concat([o[i] for o in outs]) for i in range(len(first)))


@dataclass(frozen=True)
class InitSource:
    """One way to make a run's initial synthetic images, registered in :data:`INITS`.

    ``init=NAME`` (``real``, ``noise``) or ``init=NAME:ARGUMENT`` (``file:PATH``, and the sources other
    modules register, e.g. a generator file) selects it for any method. ``make(distiller, argument,
    gen)`` returns ``ipc`` normalised images per class, class by class, drawing every random number
    from ``gen``; ``check(argument, info, ipc)`` refuses bad input before any data is read (``info`` is
    the dataset's description when it is known without reading it, else ``None``). ``form`` is how
    the setting is written (``file:PATH``), ``help`` one line for ``--help``.
    """

    make: Callable[["Distiller", str, torch.Generator], torch.Tensor]
    form: str
    help: str
    check: Callable[[str, DatasetInfo | None, int], None] | None = None

    @property
    def takes_argument(self) -> bool:
        return ":" in self.form


#: initialisation sources: name -> :class:`InitSource` (``init=NAME`` or ``init=NAME:ARGUMENT``)
INITS: Registry = Registry("initialisation")
_INIT_ORDER: list[str] = []


def register_init(name: str, source: InitSource) -> InitSource:
    """Register an initialisation source (the order of registration is the order messages list them)."""
    INITS.register(name, source, help=source.help)
    _INIT_ORDER.append(INITS._key(name))
    return source


def init_forms() -> list[str]:
    """How every registered source is written (``real``, ``noise``, ``file:PATH``, ...)."""
    return [INITS.get(n).form for n in _INIT_ORDER]


def parse_init(spec: str) -> tuple[str, str]:
    """``"file:x.safetensors"`` -> ``("file", "x.safetensors")``; ``"real"`` -> ``("real", "")``.

    Only the text before the first ``:`` names the source; the rest (a path) is kept as written.
    """
    name, sep, argument = str(spec).partition(":")
    key = INITS._key(name) if name.strip() else ""
    known = ", ".join(repr(f) for f in init_forms())
    if key not in INITS:
        raise ConfigError(f"init={spec!r} is not a known initialisation: expected one of {known}")
    source: InitSource = INITS.get(key)
    if source.takes_argument and not argument.strip():
        raise ConfigError(f"init={spec!r}: expected {source.form} ({source.help})")
    if not source.takes_argument and sep:
        raise ConfigError(f"init={spec!r}: {key!r} takes no argument; expected one of {known}")
    return key, argument


def check_init(spec: str, dataset: str, ipc: int, origin: str = "") -> None:
    """Check the ``init`` setting before any data is read: a registered source, well formed, and
    whatever the source can check against the dataset's known description (a file that exists, of
    this dataset, with enough images). The message names the setting and where it came from."""
    from tinyset.data.base import get_spec
    from tinyset.errors import TinysetError

    where = f" ({origin})" if origin else ""
    try:
        name, argument = parse_init(spec)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace(f"init={spec!r}", f"init={spec!r}{where}", 1)) from None
    source: InitSource = INITS.get(name)
    if source.check is None:
        return
    info = None
    if ":" not in dataset:  # a family dataset (imagefolder:PATH) is checked when the run starts
        try:
            info = get_spec(dataset).info
        except TinysetError:  # not a registered dataset (a test's own): checked when the run starts
            info = None
    try:
        source.check(argument, info, ipc)
    except (ConfigError, ArtifactError) as exc:
        raise type(exc)(f"init={spec}{where}: {exc}") from None


def _init_real(d: "Distiller", argument: str, gen: torch.Generator) -> torch.Tensor:
    return torch.cat([d.pool.sample_class(c, d.ipc, gen) for c in range(d.info.num_classes)])


def _init_noise(d: "Distiller", argument: str, gen: torch.Generator) -> torch.Tensor:
    c, (h, w) = d.info.channels, d.info.image_size
    return torch.randn(d.info.num_classes * d.ipc, c, h, w, generator=gen).to(d.device)


def check_init_images(path: Any, file_info: DatasetInfo, counts: list[int], info: DatasetInfo, ipc: int,
                      what: str = "synthetic set") -> None:
    """Refuse a file of another dataset, of other image shapes or with fewer than ``ipc`` images of a
    class (``counts``: images per class the file can give). Messages name the file and both values."""
    if file_info.name != info.name:
        raise ConfigError(f"{path}: {what} of dataset {file_info.name!r}; this run distils {info.name!r}")
    have = (file_info.channels, *file_info.image_size)
    want = (info.channels, *info.image_size)
    if have != want:
        raise ConfigError(f"{path}: {what} with images of [C, H, W] = {list(have)}; dataset {info.name!r} has "
                          f"{list(want)}")
    if file_info.num_classes != info.num_classes:
        raise ConfigError(f"{path}: {what} with {file_info.num_classes} classes; dataset {info.name!r} has "
                          f"{info.num_classes}")
    for c, n in enumerate(counts):
        if n < ipc:
            raise ConfigError(f"{path}: {what} has {n} image(s) of class {c} ({info.class_names[c]!r}); ipc={ipc} "
                              f"needs at least {ipc} of every class")


def renormalize(images: torch.Tensor, src: DatasetInfo, dst: DatasetInfo) -> torch.Tensor:
    """Normalised images of ``src`` in the normalisation of ``dst`` (exact, affine, not clamped)."""
    if tuple(src.mean) == tuple(dst.mean) and tuple(src.std) == tuple(dst.std):
        return images
    shape = (1, -1, 1, 1)
    mean_s, std_s = torch.tensor(src.mean).view(shape), torch.tensor(src.std).view(shape)
    mean_d, std_d = torch.tensor(dst.mean).view(shape), torch.tensor(dst.std).view(shape)
    return ((images * std_s + mean_s) - mean_d) / std_d


def _load_init_synset(path: str):
    from tinyset.synset import SyntheticSet

    return SyntheticSet.load(path)


def _check_init_file(argument: str, info: DatasetInfo | None, ipc: int) -> None:
    synset = _load_init_synset(argument)
    if info is not None:
        check_init_images(argument, synset.info, synset.class_counts(), info, ipc)


def _init_file(d: "Distiller", argument: str, gen: torch.Generator) -> torch.Tensor:
    """The first ``ipc`` images of every class of a synthetic-set file (by hard label, in file order)."""
    try:
        synset = _load_init_synset(argument)
        check_init_images(argument, synset.info, synset.class_counts(), d.info, d.ipc)
    except (ConfigError, ArtifactError) as exc:
        raise type(exc)(f"init=file:{argument}: {exc}") from None
    images = torch.cat([synset.class_images(c)[:d.ipc] for c in range(d.info.num_classes)])
    if synset.zca is None and d.zca is None:
        return renormalize(images, synset.info, d.info)
    images = renormalize(synset.zca.unwhiten(images) if synset.zca is not None else images, synset.info, d.info)
    return d.zca.whiten(images) if d.zca is not None else images  # from the file's space to the run's


def _parse_select(argument: str) -> tuple[str, dict[str, str]]:
    """``"mi,diversity=0.1"`` -> ``("mi", {"diversity": "0.1"})``: a selector and its ``--set`` options."""
    name, *items = [part.strip() for part in argument.split(",")]
    sets: dict[str, str] = {}
    for item in filter(None, items):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{item!r}: expected select:METHOD[,KEY=VALUE...], e.g. select:mi,diversity=0.1")
        sets[key.strip().replace("-", "_")] = value.strip()
    return name, sets


def _check_init_select(argument: str, info: DatasetInfo | None, ipc: int) -> None:
    from tinyset.select import resolve_options

    name, sets = _parse_select(argument)
    resolve_options(name, info.name if info is not None else "", ipc, sets=sets)


def _init_select(d: "Distiller", argument: str, gen: torch.Generator) -> torch.Tensor:
    """The images a registered selector picks from the run's own training images (never the held-out
    validation images of ``--eval-every``), seeded from the run's generator."""
    from tinyset.rng import derive_seed
    from tinyset.select import select

    name, sets = _parse_select(argument)
    result = select(name, d.pool.source, d.ipc, seed=derive_seed(gen), device=d.device, sets=sets)
    return d.pool.images[torch.as_tensor(result.indices, dtype=torch.long).to(d.pool.images.device)]


register_init("real", InitSource(_init_real, "real", "random real images of the class"))
register_init("noise", InitSource(_init_noise, "noise", "standard Gaussian noise"))
register_init("file", InitSource(_init_file, "file:PATH", "the first ipc images per class of a synthetic-set "
                                 "file (.safetensors) of the same dataset", _check_init_file))
register_init("select", InitSource(_init_select, "select:METHOD[,KEY=VALUE...]",
                                   "the ipc images per class a selector (`tinyset select --method METHOD`, with "
                                   "its options) picks from the run's training images, e.g. select:mi,diversity=0.1",
                                   _check_init_select))


__all__ = ["Distiller", "DistillConfig", "DistillContext", "whiten_pool", "Row", "Rule", "Table", "hp", "INITS", "InitSource",
           "register_init", "parse_init", "check_init", "init_forms", "check_init_images", "renormalize"]
