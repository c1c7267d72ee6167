"""Evaluation protocols: named presets (``presets/evaluate/*.json``) plus overrides."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tinyset.errors import ConfigError
from tinyset.training import check_number


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
    augment: str = "dsa"  # dsa | none
    dsa_strategy: str | None = None  # None: the dataset's default (no flips for digits)
    num_models: int = 5
    precision: str = "auto"  # auto | fp32 | bf16
    compile: bool | None = None  # None: compile when the run is long enough to pay for it
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Reject impossible values: every number finite and in range, the messages name the field."""
        own = "protocol"
        ints = {"epochs": 1, "num_models": 1, "batch_size": 1}
        for name, low in ints.items():
            object.__setattr__(self, name, check_number(own, name, getattr(self, name), low=low, integer=True))
        if self.lr is not None:
            object.__setattr__(self, "lr", check_number(own, "lr", self.lr, low=0, low_open=True))
        object.__setattr__(self, "momentum", check_number(own, "momentum", self.momentum, low=0, high=1,
                                                          high_open=True))
        object.__setattr__(self, "weight_decay", check_number(own, "weight_decay", self.weight_decay, low=0))
        object.__setattr__(self, "lr_decay_at", check_number(own, "lr_decay_at", self.lr_decay_at, low=0,
                                                             high=1))
        object.__setattr__(self, "lr_decay_factor", check_number(own, "lr_decay_factor", self.lr_decay_factor,
                                                                 low=0, high=1, low_open=True))
        if self.augment not in ("dsa", "none"):
            raise ConfigError(f"protocol augment must be 'dsa' or 'none', got {self.augment!r}")
        if self.schedule not in ("fraction", "reference"):
            raise ConfigError(f"protocol schedule must be 'fraction' or 'reference', got {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"protocol precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        if self.compile not in (None, True, False):
            raise ConfigError(f"protocol compile must be true, false or null (automatic), got {self.compile!r}")

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
