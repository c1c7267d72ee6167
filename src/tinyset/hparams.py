"""Hyper-parameters as typed data: fields with defaults, ranges and help; published tables with
their sources; the ``cpu`` profile as a rule; one resolver that records where every value came from.

A method declares its configuration as a dataclass whose fields are made with :func:`hp`::

    @dataclass
    class Config(DistillConfig):
        lr_net: float = hp(0.01, "learning rate of the matching network", gt=0)

and its published settings as a :class:`Table` of :class:`Row` s (each row names its source). The
values of one run are resolved by :func:`resolve` in this order, each layer overriding the ones
before it and each value remembering the layer it came from:

1. ``default``  the field's default
2. ``paper``    the rows of the method's table that match the dataset and ipc
3. ``cpu``      the method's :class:`Rule` for a 2-core CPU (profile ``cpu`` only)
4. ``file``     a user's TOML file (``--config FILE.toml``)
5. ``flag``     ``--set key=value`` and the command's own flags (``--iterations``, ...)

Every value is validated in one place (:func:`check_value`): the error names the field, the value,
where it came from and what is allowed.
"""
from __future__ import annotations

import math
import sys
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from tinyset.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: the largest magnitudes a setting may have (tensors are float32; counts fit int64 with room)
FLOAT_LIMIT = 3.4e38
INT_LIMIT = 2**53
#: the layers of :func:`resolve`, lowest first
LAYERS = ("default", "paper", "cpu", "file", "flag")
PROFILES = ("paper", "cpu")


def hp(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
       le: float | None = None, lt: float | None = None, choices: Sequence[Any] | None = None,
       optional: bool = False) -> Any:
    """A hyper-parameter field: default, one-line help, and the allowed range or choices.

    ``optional=True`` allows ``None`` (meaning "decided by the method", documented in ``help``).
    """
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt,
            "choices": tuple(choices) if choices is not None else None, "optional": optional}
    return field(default=default, metadata=meta)


def describe_range(integer: bool, low: float | None = None, high: float | None = None,
                   low_open: bool = False, high_open: bool = False) -> str:
    """"an integer >= 1", "a finite number in (0, 1]", ...: the one wording of a numeric range."""
    what = "an integer" if integer else "a finite number"
    if low is not None and high is not None:
        return what + f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return what + f" {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return what + f" {'<' if high_open else '<='} {high:g}"
    return what


@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: type
    default: Any
    help: str
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    optional: bool = False

    def allowed(self) -> str:
        """The allowed values in words, for messages and ``--help``."""
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        elif self.type in (int, float):
            low = self.gt if self.gt is not None else self.ge
            high = self.lt if self.lt is not None else self.le
            text = describe_range(self.type is int, low, high, self.gt is not None, self.lt is not None)
        else:
            text = {str: "a string", bool: "true or false"}[self.type]
        return text + (" (or none)" if self.optional else "")


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _field_type(annotation: Any) -> type:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    base = text.replace("None", "").replace("|", "").replace("Optional[", "").replace("]", "").strip()
    if base not in _TYPES:
        raise TypeError(f"hyper-parameter type {text!r} is not one of int, float, str, bool")
    return _TYPES[base]


@dataclass
class HParams:
    """Base of every typed configuration. Subclasses are dataclasses whose fields use :func:`hp`."""

    @classmethod
    def specs(cls) -> dict[str, FieldSpec]:
        out = {}
        for f in fields(cls):
            m = f.metadata
            if "help" not in m:
                raise TypeError(f"{cls.__name__}.{f.name} is not declared with hp()")
            default = f.default if f.default is not MISSING else None
            out[f.name] = FieldSpec(f.name, _field_type(f.type), default, m["help"], m["ge"], m["gt"],
                                    m["le"], m["lt"], m["choices"], m["optional"])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def describe(cls) -> str:
        """One line per field: name, default, allowed values, help (for ``tinyset methods``)."""
        lines = []
        for s in cls.specs().values():
            lines.append(f"  {s.name:<14} default {s.default!r:<10} {s.allowed():<34} {s.help}")
        return "\n".join(lines)


def _parse_text(spec: FieldSpec, text: str) -> Any:
    """A ``--set`` value (always text) as the field's type."""
    t = text.strip()
    if spec.optional and t.lower() in ("none", "null", ""):
        return None
    if spec.type is bool:
        if t.lower() in ("true", "on", "yes", "1"):
            return True
        if t.lower() in ("false", "off", "no", "0"):
            return False
        raise ValueError
    if spec.type is int:
        if len(t) > 20:
            raise ValueError
        return int(t)
    if spec.type is float:
        return float(t)
    return t


def check_value(spec: FieldSpec, value: Any, origin: str) -> Any:
    """``value`` converted to the field's type and checked against its range; ConfigError if not."""

    def bad(why: str = "") -> ConfigError:
        return ConfigError(f"{spec.name}={value!r} ({origin}) is not allowed: expected {spec.allowed()}"
                           + (f"; {why}" if why else ""))

    if isinstance(value, str) and spec.type is not str:
        try:
            value = _parse_text(spec, value)
        except ValueError:
            raise bad() from None
    if value is None:
        if spec.optional:
            return None
        raise bad()
    if spec.type is bool:
        if not isinstance(value, bool):
            raise bad()
    elif spec.type is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        if abs(value) > INT_LIMIT:
            raise bad(f"integers are limited to {INT_LIMIT}")
    elif spec.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        try:
            value = float(value)
        except OverflowError:
            raise bad(f"numbers are limited to {FLOAT_LIMIT:.3g} (float32)") from None
        if not math.isfinite(value):
            raise bad("NaN and infinity are never allowed")
        if abs(value) > FLOAT_LIMIT:
            raise bad(f"numbers are limited to {FLOAT_LIMIT:.3g} (float32)")
    elif spec.type is str and not isinstance(value, str):
        raise bad()
    if spec.choices is not None and value not in spec.choices:
        raise bad()
    if spec.type in (int, float):
        if ((spec.gt is not None and not value > spec.gt) or (spec.ge is not None and not value >= spec.ge)
                or (spec.lt is not None and not value < spec.lt) or (spec.le is not None and not value <= spec.le)):
            raise bad()
    return value


@dataclass(frozen=True)
class Row:
    """Settings published (or adapted, as ``source`` says) for some datasets and ipc values.

    ``datasets`` and ``ipcs`` of ``None`` match any. Dataset families (``imagefolder:PATH``) match
    by family name (``imagefolder``).
    """

    values: Mapping[str, Any]
    source: str
    datasets: tuple[str, ...] | None = None
    ipcs: tuple[int, ...] | None = None

    def matches(self, dataset: str, ipc: int) -> bool:
        family = dataset.lower().partition(":")[0]
        return ((self.datasets is None or family in self.datasets)
                and (self.ipcs is None or ipc in self.ipcs))


@dataclass(frozen=True)
class Table:
    """A method's published settings: matching rows apply in order (later rows override)."""

    rows: tuple[Row, ...]

    def lookup(self, dataset: str, ipc: int) -> list[Row]:
        return [r for r in self.rows if r.matches(dataset, ipc)]


@dataclass(frozen=True)
class Rule:
    """A profile as a rule on the resolved values: ``apply(values, dataset, ipc) -> changes``."""

    description: str
    apply: Callable[[Mapping[str, Any], str, int], dict[str, Any]]


def read_toml(path: str | Path) -> dict[str, Any]:
    """A user's settings file: a flat TOML table of field names to values."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--config {p}: is a folder; expected a TOML file of settings (key = value)")
    if not p.is_file():
        raise ConfigError(f"--config {p}: no such file; expected a TOML file of settings (key = value)")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"--config {p}: cannot be read ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {p}: not valid TOML ({exc})") from None
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(f"--config {p}: tables ([{nested[0]}]) are not supported; write the settings as "
                          f"top-level key = value lines")
    return data


def parse_sets(items: Sequence[str]) -> dict[str, str]:
    """``["a=1", "b=x"]`` -> ``{"a": "1", "b": "x"}``; a malformed item is a ConfigError."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set iterations=200")
        key = key.strip().replace("-", "_")
        if key in out:
            raise ConfigError(f"--set {key} is given twice")
        out[key] = value
    return out


@dataclass
class Resolved:
    """The values of one run, and for every field the layer (and detail) it came from."""

    values: HParams
    sources: dict[str, str]

    def to_json(self) -> dict[str, Any]:
        return {"values": self.values.to_dict(), "sources": dict(self.sources)}


def resolve(cls: type[HParams], *, dataset: str, ipc: int, profile: str = "cpu", table: Table | None = None,
            cpu_rule: Rule | None = None, file: str | Path | None = None,
            sets: Mapping[str, Any] | None = None, flags: Mapping[str, Any] | None = None,
            complete: Callable[[dict[str, Any], str, int], dict[str, tuple[Any, str]]] | None = None) -> Resolved:
    """Resolve ``cls`` for ``(dataset, ipc)`` through the layers of the module docstring.

    ``sets`` are ``--set`` values (text or typed), ``flags`` the command's own flags (``None`` =
    not given); a key given both ways is an error. ``complete(values, dataset, ipc)`` may fill fields
    left ``None`` by every layer (e.g. DC's loop counts from ipc) and returns ``{name: (value, why)}``.
    """
    if profile not in PROFILES:
        raise ConfigError(f"--preset {profile!r} is not known; expected one of {', '.join(PROFILES)}")
    specs = cls.specs()
    values: dict[str, Any] = {n: s.default for n, s in specs.items()}
    sources: dict[str, str] = {n: "default" for n in specs}

    def apply(changes: Mapping[str, Any], origin: str, what: str) -> None:
        unknown = [k for k in changes if k not in specs]
        if unknown:
            raise ConfigError(f"{what}: unknown setting(s) {', '.join(sorted(unknown))}; "
                              f"{cls.__name__} has: {', '.join(specs)}")
        for k, v in changes.items():
            values[k] = check_value(specs[k], v, what)
            sources[k] = origin

    for row in (table.lookup(dataset, ipc) if table else []):
        apply(row.values, f"paper: {row.source}", f"paper table row ({row.source})")
    if profile == "cpu" and cpu_rule is not None:
        apply(cpu_rule.apply(dict(values), dataset, ipc), f"cpu: {cpu_rule.description}", "cpu rule")
    if file is not None:
        apply(read_toml(file), f"file: {file}", f"--config {file}")
    sets = dict(sets or {})
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    both = sorted(set(sets) & set(flags))
    if both:
        raise ConfigError(f"{both[0]} is given both by --set and by its own flag; give it once")
    for k, v in sets.items():
        apply({k: v}, f"flag: --set {k}", f"--set {k}")
    for k, v in flags.items():
        apply({k: v}, f"flag: --{k.replace('_', '-')}", f"--{k.replace('_', '-')}")
    if complete is not None:
        for k, (v, why) in complete(dict(values), dataset, ipc).items():
            values[k] = check_value(specs[k], v, why)
            sources[k] = why
    missing = [n for n, s in specs.items() if values[n] is None and not s.optional]
    if missing:
        raise ConfigError(f"{cls.__name__}: no value for {', '.join(missing)}")
    return Resolved(cls(**values), sources)


__all__ = ["hp", "HParams", "FieldSpec", "Row", "Table", "Rule", "Resolved", "resolve", "check_value", "FLOAT_LIMIT", "INT_LIMIT",
           "read_toml", "parse_sets", "describe_range", "LAYERS", "PROFILES"]
