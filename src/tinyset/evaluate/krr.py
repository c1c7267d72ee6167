"""The KRR evaluation protocols: predict the test set by kernel ridge regression on the set.

No network is trained *to classify*: for every architecture, ``num_models`` networks are built from
the evaluation seed, each gives last-layer features of the set's images and of the test images,
and the test images are classified by the argmax of the kernel ridge regression prediction
``K_ts (K_ss + ridge * tr(K_ss)/n * I)^-1 Y_s`` (:func:`tinyset.methods.krr.krr_predict`, linear
kernel of the features, float64 solve) -- the prediction FRePo (Zhou et al., NeurIPS 2022) and KIP
(Nguyen et al., 2021) report as "KRR" accuracy, with a finite network's features in place of
KIP's infinite-width NTK. Every network gives one accuracy; rows report mean and std as the SGD
protocols do.

Two protocols, registered in :data:`tinyset.evaluate.protocol.EVALUATORS`:

* ``krr`` (recorded as ``krr-trained``; the default): every network is first trained briefly on
  the set itself, ``train_steps`` Adam steps (lr ``lr_net``) on the MSE of its outputs against
  ``Y_s`` -- the regime the FRePo pool's networks live in while the set is distilled, so the
  kernel is one the set was made for, and it needs no real training image;
* ``krr-random`` (``train_steps = 0``): features of freshly initialised networks (a random-feature
  kernel; cheaper, and usually lower for a finite ConvNet).

``Y_s`` are the set's learned regression targets (``extras["krr_targets"]``, what ``--method
krr`` stores) when it has them, else its labels as centred rows ``label - 1/K`` (a one-hot row
for hard labels, the probability row for soft ones). The results' label regime says which
(``krr (learned targets)`` / ``krr (one-hot targets)`` / ``krr (soft-label targets)``) and the
protocol name starts with ``krr-``, so a KRR accuracy is never put beside an SGD one in one table
(:func:`tinyset.evaluate.report.comparison_table` refuses results of different regimes). The test
set is only used for the reported accuracies.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from tinyset.data.base import ImageDataset
from tinyset.errors import ConfigError
from tinyset.evaluate.protocol import EVALUATORS
from tinyset.models import MODELS, create_model
from tinyset.results import EvaluationResult, ModelScore, mean_std
from tinyset.rng import derive_seed, make_generator
from tinyset.runtime import autocast, resolve_precision

#: the extra tensor of a set file holding learned regression targets (written by ``--method krr``)
TARGETS_EXTRA = "krr_targets"


@dataclass(frozen=True)
class KRRProtocol:
    """Settings of a KRR evaluation (see the module docstring)."""

    name: str = "krr-trained"
    train_steps: int = 100
    lr_net: float = 3e-4
    batch_size: int = 500
    ridge: float = 1e-6
    num_models: int = 5
    chunk: int = 1000  # test images per feature pass
    source: str = ("tinyset: kernel ridge regression on last-layer features, FRePo-style (Zhou et al. 2022); "
                   "networks trained briefly on the set (100 Adam steps at 3e-4, MSE on its targets)")

    def __post_init__(self) -> None:
        for field, low in (("train_steps", 0), ("batch_size", 1), ("num_models", 1), ("chunk", 1)):
            v = getattr(self, field)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ConfigError(f"KRR protocol {self.name!r}: {field} must be an integer >= {low}, got {v!r}")
        for field in ("lr_net", "ridge"):
            v = getattr(self, field)
            if not (isinstance(v, (int, float)) and v > 0 and v < float("inf")):
                raise ConfigError(f"KRR protocol {self.name!r}: {field} must be a finite number > 0, got {v!r}")
        if not self.name.startswith("krr-"):
            raise ConfigError(f"KRR protocol names start with 'krr-' (never mixed with SGD protocols), got "
                              f"{self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {**asdict(self), "kind": "krr"}


#: the registered presets
PRESETS = {
    "krr": KRRProtocol(),
    "krr-random": KRRProtocol(name="krr-random", train_steps=0,
                              source="tinyset: kernel ridge regression on last-layer features of freshly "
                                     "initialised networks (random-feature kernel)"),
}


def krr_predict(feat_syn: torch.Tensor, targets: torch.Tensor, feat_query: torch.Tensor, ridge: float,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Kernel ridge regression with the linear kernel of features:
    ``K_qs (K_ss + ridge * tr(K_ss)/n * I)^-1 Y_s`` (``[Q, K]``, computed in ``dtype``, returned in
    float32, or float64 for float64 features). Differentiable in ``feat_syn``, ``targets`` and ``feat_query``. The solve is a Cholesky
    factorisation (``torch.linalg.cholesky_ex`` + ``cholesky_solve``) with an LU solve
    (``torch.linalg.solve``) when the regularised kernel is not numerically positive definite."""
    fs, fq, y = feat_syn.to(dtype), feat_query.to(dtype), targets.to(dtype)
    kss = fs @ fs.T
    n = kss.shape[0]
    lam = ridge * torch.diagonal(kss).sum() / n
    reg = kss + lam * torch.eye(n, dtype=dtype, device=kss.device)
    chol, info = torch.linalg.cholesky_ex(reg)
    if int(info) == 0:
        alpha = torch.cholesky_solve(y, chol)
    else:
        alpha = torch.linalg.solve(reg, y)
    return ((fq @ fs.T) @ alpha).to(torch.promote_types(feat_syn.dtype, torch.float32))


def set_targets(synset: Any) -> tuple[torch.Tensor, str]:
    """``(Y_s [N, K] float32, regime)``: the learned targets of a ``krr`` set, else the labels as
    centred rows."""
    k = synset.info.num_classes
    learned = (getattr(synset, "extras", None) or {}).get(TARGETS_EXTRA)
    if learned is not None:
        if tuple(learned.shape) != (len(synset), k):
            raise ConfigError(f"the set's extra tensor {TARGETS_EXTRA!r} has shape {tuple(learned.shape)}; "
                              f"expected [{len(synset)}, {k}] (one target row per image)")
        return learned.float(), "krr (learned targets)"
    kind = "one-hot" if synset.labels.dim() == 1 else "soft-label"
    return regression_targets(synset.labels, k), f"krr ({kind} targets)"


def regression_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Stored labels as regression targets (FRePo's): centred rows, ``onehot(y) - 1/K`` for class
    indices and ``p - 1/K`` for probability rows; float32 ``[N, K]``."""
    rows = labels.float() if labels.dim() == 2 else F.one_hot(labels, num_classes).float()
    return rows - 1.0 / num_classes


def _features(net: torch.nn.Module, x: torch.Tensor, precision: str, chunk: int) -> torch.Tensor:
    outs = []
    with torch.no_grad(), autocast(x.device, precision):
        for part in x.split(chunk):
            outs.append(net.embed(part).float().flatten(1))
    return torch.cat(outs)


def _train_briefly(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, protocol: KRRProtocol, precision: str,
                   gen: torch.Generator) -> None:
    """``protocol.train_steps`` Adam steps of ``net`` on ``(x, y)`` (MSE), minibatches drawn from ``gen``."""
    opt = torch.optim.Adam(net.parameters(), lr=protocol.lr_net)
    net.train()
    n = x.shape[0]
    for _ in range(protocol.train_steps):
        if n > protocol.batch_size:
            idx = torch.randperm(n, generator=gen)[:protocol.batch_size].to(x.device)
            xb, yb = x[idx], y[idx]
        else:
            xb, yb = x, y
        with autocast(x.device, precision):
            out = net(xb).float()
        loss = F.mse_loss(out, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def evaluate_krr(synset: Any, test: ImageDataset, models: Sequence[str] = ("convnet",),
                 protocol: KRRProtocol | str = "krr", seed: int = 0, device: str | torch.device = "cpu",
                 precision: str = "fp32", num_models: int | None = None) -> EvaluationResult:
    """Test accuracy of kernel ridge regression on ``synset`` (module docstring), one row per
    architecture in ``models``; ``protocol`` is a :class:`KRRProtocol` or a preset name."""
    if isinstance(protocol, str):
        if protocol not in PRESETS:
            raise ConfigError(f"unknown KRR protocol {protocol!r}; known: {', '.join(sorted(PRESETS))}")
        protocol = PRESETS[protocol]
    if num_models is not None:
        from dataclasses import replace

        protocol = replace(protocol, num_models=int(num_models))
    names = [MODELS._key(m) for m in models]
    for m in names:
        if m not in MODELS:
            raise ConfigError(f"unknown model {m!r}; known: {', '.join(MODELS.names())}")
    info = synset.info
    if test.info.channels != info.channels or tuple(test.info.image_size) != tuple(info.image_size):
        raise ConfigError(f"test set {test.info.name} has images {test.info.channels}x{test.info.image_size} "
                          f"but the set has {info.channels}x{info.image_size}")
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    targets, regime = set_targets(synset)
    x_syn = synset.images.to(device, torch.float32)
    y_syn = targets.to(device)
    x_test = test.normalized(device)
    if synset.zca is not None:
        x_test = synset.zca.whiten(x_test, inplace=True)
    y_test = test.labels.to(device)
    root = make_generator(seed)
    rows: list[ModelScore] = []
    for name in names:
        start = time.perf_counter()
        accs: list[float] = []
        train_s = 0.0
        for _ in range(protocol.num_models):
            gen = make_generator(derive_seed(root))
            net = create_model(name, info.channels, info.num_classes, info.image_size, generator=gen, device=device)
            t0 = time.perf_counter()
            if protocol.train_steps:
                _train_briefly(net, x_syn, y_syn, protocol, precision, gen)
            train_s += time.perf_counter() - t0
            net.eval()
            f_syn = _features(net, x_syn, precision, protocol.chunk)
            correct = 0
            for part_x, part_y in zip(x_test.split(protocol.chunk), y_test.split(protocol.chunk)):
                pred = krr_predict(f_syn, y_syn, _features(net, part_x, precision, protocol.chunk), protocol.ridge)
                correct += int((pred.argmax(1) == part_y).sum())
            accs.append(correct / len(y_test))
        total = time.perf_counter() - start
        mean, std = mean_std(accs)
        rows.append(ModelScore(model=name, accuracies=accs, mean=mean, std=std, train_seconds=train_s, seconds=total,
                               seconds_per_model=total / protocol.num_models, label_regime=regime,
                               test_seconds=total - train_s, epochs_trained=0))
    proto = {**protocol.to_dict(), "precision_used": precision,
             "targets": f"extra.{TARGETS_EXTRA}" if regime.endswith("(learned targets)") else "labels - 1/K"}
    if synset.zca is not None:
        proto["zca"] = synset.zca.describe()
    res = EvaluationResult(protocol=proto, dataset=info.name, num_images=len(synset), seed=seed, device=str(device),
                           results=rows, label_regime=regime)
    res.set = {"method": synset.meta.get("method"), "ipc": synset.ipc, "num_images": len(synset),
               "meta": synset.meta}
    return res


def _register(preset: str):
    def run(synset: Any, test: ImageDataset, models: Sequence[str], seed: int, device: str | torch.device,
            precision: str, num_models: int | None = None) -> EvaluationResult:
        return evaluate_krr(synset, test, models, preset, seed, device, precision, num_models)

    run.__doc__ = PRESETS[preset].source
    return run


for _name in PRESETS:
    EVALUATORS.register(_name, _register(_name), help=PRESETS[_name].source)

__all__ = ["KRRProtocol", "PRESETS", "TARGETS_EXTRA", "evaluate_krr", "krr_predict", "set_targets"]
