"""Results as readable tables (JSON comes from :meth:`tinyset.results.EvaluationResult.to_dict`).

Every row names its label regime (``hard``, ``learned (...)``, ``teacher (...)``; see
:func:`tinyset.evaluate.label_regime`). Accuracies under different regimes are not comparable (a
random subset with a teacher's soft labels comes close to distilled data with hard labels), so
:func:`comparison_table`, which puts several evaluations side by side, refuses to mix them; nor
does it mix accuracies measured on the test split with those on a validation split (``scored_on``).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from tinyset.errors import ConfigError
from tinyset.results import UNRECORDED_REGIME, EvaluationResult, ModelScore


def _field(row: Any, key: str, default: Any = None) -> Any:
    if isinstance(row, Mapping):
        return row.get(key, default)
    return getattr(row, key, default)


def _regime(row: Any) -> str:
    return str(_field(row, "label_regime", None) or UNRECORDED_REGIME)


def _align(head: Sequence[str], body: Sequence[Sequence[str]], title: str = "") -> str:
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()
    out = [title] if title else []
    out += [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip() for b in body]
    return "\n".join(out)


def _accuracy(row: Any) -> str:
    return f"{100 * _field(row, 'mean'):.2f} ± {100 * _field(row, 'std'):.2f}"


def _split(res: Any) -> str:
    """The split a result's networks were scored on (``test`` for results written before it was recorded)."""
    return str((_field(res, "scored_on", None) or {}).get("split", "test"))


def format_table(rows: Sequence[ModelScore | Mapping[str, Any]], title: str = "", split: str = "test") -> str:
    """:class:`~tinyset.results.ModelScore` rows (or dicts with the same keys) -> aligned text table,
    with the label regime of every row (``unrecorded`` for results written before it was recorded).
    ``split``: the real images the accuracies were measured on (the column's name)."""
    head = ("model", f"{split} acc (%)", "models", "train s/model", "labels")
    body = [(str(_field(r, "model")), _accuracy(r), str(len(_field(r, "accuracies"))),
             f"{_field(r, 'seconds_per_model'):.1f}", _regime(r)) for r in rows]
    return _align(head, body, title)


def check_same_regime(results: Sequence[EvaluationResult | Mapping[str, Any]],
                      names: Sequence[str] | None = None) -> str:
    """The one label regime of ``results`` (every row of every result); :class:`ConfigError` naming
    each result's regime when they differ (``names`` label the results in the message)."""
    if not results:
        raise ConfigError("no results to compare")
    names = list(names) if names is not None else [_name(r, i) for i, r in enumerate(results)]
    seen: dict[str, list[str]] = {}
    for name, res in zip(names, results):
        for regime in {_regime(res), *(_regime(row) for row in _field(res, "results", []) or [])}:
            seen.setdefault(regime, []).append(name)
    if len(seen) > 1:
        listing = "; ".join(f"{regime}: {', '.join(who)}" for regime, who in seen.items())
        raise ConfigError(f"cannot compare results under different label regimes ({listing}); evaluate every "
                          f"set under the same regime (e.g. a random subset with the same --teacher: "
                          f"`tinyset select --method random` then `tinyset evaluate SUBSET --teacher DIR`)")
    return next(iter(seen))


def check_same_split(results: Sequence[EvaluationResult | Mapping[str, Any]], names: Sequence[str]) -> str:
    """The one split every result was scored on (``scored_on``); :class:`ConfigError` naming each
    result's split when they differ (a validation accuracy is not a test accuracy)."""
    seen: dict[str, list[str]] = {}
    for name, res in zip(names, results):
        seen.setdefault(_split(res), []).append(name)
    if len(seen) > 1:
        listing = "; ".join(f"{split}: {', '.join(who)}" for split, who in seen.items())
        raise ConfigError(f"cannot compare accuracies measured on different splits ({listing}); evaluate every "
                          f"set with the same --split")
    return next(iter(seen))


def _name(res: Any, i: int) -> str:
    file = _field(res, "file")
    method = (_field(res, "set", {}) or {}).get("method")
    return str(file or method or f"result {i + 1}")


def comparison_table(results: Sequence[EvaluationResult | Mapping[str, Any]],
                     names: Sequence[str] | None = None, title: str = "") -> str:
    """Several evaluations side by side, one line per (result, architecture): the set (``names``,
    else the file or method), its number of images, the model, the accuracy, the protocol.

    All results must share one label regime (:func:`check_same_regime`); the table's title line
    names it. Results are :class:`~tinyset.results.EvaluationResult` or their JSON dicts.
    """
    if names is not None and len(names) != len(results):
        raise ConfigError(f"comparison_table: {len(results)} results but {len(names)} names")
    labels = list(names) if names is not None else [_name(r, i) for i, r in enumerate(results)]
    regime = check_same_regime(results, labels)
    split = check_same_split(results, labels)
    head = ("set", "images", "model", f"{split} acc (%)", "models", "protocol")
    body = []
    for label, res in zip(labels, results):
        protocol = (_field(res, "protocol", {}) or {}).get("name", "?")
        for row in _field(res, "results", []) or []:
            body.append((label, str(_field(res, "num_images", "?")), str(_field(row, "model")), _accuracy(row),
                         str(len(_field(row, "accuracies"))), str(protocol)))
    heading = f"{title}  [labels: {regime}]" if title else f"labels: {regime}"
    return _align(head, body, heading)


__all__ = ["format_table", "comparison_table", "check_same_regime", "check_same_split"]
