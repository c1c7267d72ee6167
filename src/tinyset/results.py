"""The results of ``evaluate``, ``baseline``, ``select``, ``distill`` and ``sample``: one typed, versioned schema.

Every result is a dataclass with :meth:`to_dict` (what ``--json`` writes). Each JSON document starts
with the same three keys::

    {"schema": "tinyset.result", "schema_version": 1,
     "kind": "evaluation" | "selection" | "distillation" | "sampling", ...}

``kind`` says which of the classes below the rest follows; :func:`result_from_dict` reads any of
them back. Fields are added with new versions, never renamed within one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch

from tinyset.errors import ArtifactError

SCHEMA = "tinyset.result"
SCHEMA_VERSION = 1
#: ``label_regime`` of a result written before tinyset recorded label regimes
UNRECORDED_REGIME = "unrecorded"


def label_regime(soft_labels: bool, learned_lr: bool, teacher_temperature: float | None = None,
                 label_kind: str = "soft labels") -> str:
    """The name of a label regime, as results record it: ``hard`` (one-hot labels, the protocol's
    lr); ``learned (soft labels, lr)`` / ``learned (soft labels)`` / ``learned (lr)`` for what the
    method learned and the set stores; ``teacher (T=...)`` (``teacher (T=..., learned lr)`` when the
    set's lr is used too) when a teacher network relabelled the images at evaluation time.
    ``label_kind`` names what was learned in place of ``soft labels`` (``regression targets`` for a
    set's learned targets under an ``mse`` protocol)."""
    if teacher_temperature is not None:
        return f"teacher (T={teacher_temperature:g}{', learned lr' if learned_lr else ''})"
    learned = [name for name, used in ((label_kind, soft_labels), ("lr", learned_lr)) if used]
    return f"learned ({', '.join(learned)})" if learned else "hard"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (numpy's default); ``(nan, nan)`` for no values."""
    if len(values) == 0:
        return float("nan"), float("nan")
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), (float(t.std(unbiased=False)) if len(values) > 1 else 0.0)


class _Result:
    """Shared JSON form of the result dataclasses."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        body = {f.name: _plain(getattr(self, f.name)) for f in fields(self)  # type: ignore[arg-type]
                if not f.metadata.get("runtime_only")}
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "kind": self.kind, **body}


def _plain(v: Any) -> Any:
    if isinstance(v, _Result):
        d = v.to_dict()
        return {k: d[k] for k in d if k not in ("schema", "schema_version", "kind")}
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if hasattr(v, "__dataclass_fields__"):
        return asdict(v)
    return v


@dataclass
class ModelScore(_Result):
    """Test accuracy of ``len(accuracies)`` freshly trained networks of one architecture."""

    kind: ClassVar[str] = "model_score"
    model: str
    accuracies: list[float]
    mean: float = float("nan")
    std: float = float("nan")
    train_seconds: float = 0.0
    seconds: float = 0.0  # training and testing
    seconds_per_model: float = 0.0
    #: the labels the networks were trained with: ``hard``, ``learned (...)`` or ``teacher (...)``
    #: (see :func:`label_regime`)
    label_regime: str = UNRECORDED_REGIME
    # -- wall time and early stopping (optional; results written before them read back with these defaults).
    # The networks of one architecture train and test as ONE batched ensemble, so every time is the
    # ensemble's (all len(accuracies) networks at once): ``train_seconds`` is its training, validation
    # passes included, test pass excluded; ``test_seconds`` its test pass; ``val_seconds`` the part of
    # ``train_seconds`` spent in validation passes.
    test_seconds: float = 0.0
    val_seconds: float = 0.0
    #: epochs the ensemble trained (fewer than the protocol's when early stopping stopped every network)
    epochs_trained: int | None = None
    #: with early stopping, per network: epochs trained when it stopped (the last epoch run if it never
    #: did), epochs trained for the weights it was tested with (its best validation epoch), and its
    #: validation accuracy there
    stop_epochs: list[int] | None = None
    best_epochs: list[int] | None = None
    val_accuracies: list[float] | None = None

    def __post_init__(self) -> None:
        if math.isnan(self.mean):
            self.mean, self.std = mean_std(self.accuracies)


@dataclass
class EvaluationResult(_Result):
    """What ``evaluate`` and ``baseline`` report: the protocol, and one row per architecture."""

    kind: ClassVar[str] = "evaluation"
    protocol: dict[str, Any]
    dataset: str
    num_images: int
    seed: int
    device: str
    results: list[ModelScore]
    #: what was evaluated: method, ipc, metadata of the set (``{"method": "full-dataset"}`` for baseline)
    set: dict[str, Any] = field(default_factory=dict)
    file: str | None = None
    runtime: dict[str, Any] = field(default_factory=dict)
    #: the label regime of every row (see :attr:`ModelScore.label_regime`)
    label_regime: str = UNRECORDED_REGIME
    #: the real images the networks were scored on: ``{"split": "test"}`` (the default, and what
    #: results written before the field existed mean), or ``{"split": "validation", ...}`` with the
    #: held-out split's description (``tinyset evaluate --split validation``; never the test split)
    scored_on: dict[str, Any] = field(default_factory=lambda: {"split": "test"})

    def score(self, model: str) -> ModelScore:
        for r in self.results:
            if r.model == model:
                return r
        raise KeyError(model)


@dataclass
class SelectionResult(_Result):
    """What ``select`` returns: the chosen indices, every sample's score, and the set they make.

    ``scores`` has one value per training sample (higher = preferred by the selector; ``-inf`` where
    a greedy method never reached the sample); ``indices`` are the chosen ones, class by class.
    """

    kind: ClassVar[str] = "selection"
    method: str
    dataset: str
    ipc: int
    seed: int
    indices: list[int]
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)
    scores: torch.Tensor | None = field(default=None, metadata={"runtime_only": True})
    synset: Any = field(default=None, metadata={"runtime_only": True})
    file: str | None = None


@dataclass
class DistillationResult(_Result):
    """What ``distill`` returns: the learned set, where the run lives, and its configuration."""

    kind: ClassVar[str] = "distillation"
    method: str
    dataset: str
    ipc: int
    seed: int
    iterations: int
    wall_time_s: float
    out_dir: str
    config: dict[str, Any] = field(default_factory=dict)
    config_sources: dict[str, str] = field(default_factory=dict)
    final_loss: float | None = None
    evaluation: EvaluationResult | None = None
    synset: Any = field(default=None, metadata={"runtime_only": True})
    #: with periodic validation: the best set by validation accuracy (iteration, mean, std, split,
    #: protocol, file); None without it
    best: dict[str, Any] | None = None


@dataclass
class SamplingResult(_Result):
    """What ``tinyset sample`` made: a set of ``ipc`` samples per class from a generator file, and how
    (``sampling``: the generator's iteration, sample seed, filter and its settings)."""

    kind: ClassVar[str] = "sampling"
    generator: str
    dataset: str
    ipc: int
    seconds: float
    sampling: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    file: str | None = None
    synset: Any = field(default=None, metadata={"runtime_only": True})


_KINDS = {c.kind: c for c in (EvaluationResult, SelectionResult, DistillationResult, SamplingResult)}


def result_from_dict(d: dict[str, Any]) -> Any:
    """Read back a result written by :meth:`to_dict` (checks schema and version)."""
    if d.get("schema") != SCHEMA:
        raise ArtifactError(f"not a tinyset result (schema {d.get('schema')!r}, expected {SCHEMA!r})")
    if d.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"tinyset result schema version {d.get('schema_version')!r}; this tinyset reads "
                            f"version {SCHEMA_VERSION}")
    cls = _KINDS.get(d.get("kind", ""))
    if cls is None:
        raise ArtifactError(f"unknown result kind {d.get('kind')!r}; expected one of {', '.join(_KINDS)}")
    body = {k: v for k, v in d.items() if k not in ("schema", "schema_version", "kind")}
    if cls is EvaluationResult:
        body["results"] = [ModelScore(**r) for r in body.get("results", [])]
    if cls is DistillationResult and body.get("evaluation"):
        ev = dict(body["evaluation"])
        ev["results"] = [ModelScore(**r) for r in ev.get("results", [])]
        body["evaluation"] = EvaluationResult(**ev)
    return cls(**body)


__all__ = ["SCHEMA", "SCHEMA_VERSION", "UNRECORDED_REGIME", "label_regime", "ModelScore", "EvaluationResult", "SelectionResult",
           "DistillationResult", "result_from_dict", "mean_std"]
