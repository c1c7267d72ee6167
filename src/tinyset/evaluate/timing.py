"""Training time saved by a small set: measured, from an evaluation and a full-data baseline.

Every :class:`~tinyset.results.ModelScore` records ``train_seconds``: the wall time its batched
ensemble spent training (validation passes included, test pass excluded). ``tinyset baseline``
records the same on the whole training split. :func:`time_saved` divides the two, per architecture,
per trained network (the ensemble's time over its number of networks, because the two results may
train different numbers of networks at once: 2 for ``fulldata``, 5 for ``dsa``). ``tinyset evaluate
FILE --baseline-json BASELINE.json`` prints it under the accuracy table.

Both times are wall times on whatever machine ran them: the ratio is meaningful only when both
ran on the same machine with the same threads and device; :func:`time_saved` lists the
differences it can see in the recorded runtimes.
"""
from __future__ import annotations

from typing import Any, Mapping

from tinyset.errors import ConfigError
from tinyset.results import EvaluationResult

#: runtime entries compared between the two results (a difference is reported, not refused)
RUNTIME_KEYS = ("device", "threads", "cpu", "precision")


def _runtime_differences(a: EvaluationResult, b: EvaluationResult) -> list[str]:
    out = [] if a.device == b.device else [f"device {a.device} vs {b.device}"]
    ra, rb = a.runtime or {}, b.runtime or {}
    for key in RUNTIME_KEYS:
        if key == "device" or key not in ra or key not in rb:
            continue
        va, vb = ra[key], rb[key]
        if key == "cpu":  # the CPU model, not its whole description
            va, vb = (va or {}).get("model"), (vb or {}).get("model")
        if va != vb:
            out.append(f"{key} {va!r} vs {vb!r}")
    return out


def time_saved(result: EvaluationResult, baseline: EvaluationResult) -> dict[str, Any]:
    """Training time per network on the full set over that on ``result``'s set, per architecture.

    ``baseline`` must be a full-training-set result of the same dataset (``set["method"] ==
    "full-dataset"``), otherwise :class:`~tinyset.errors.ConfigError`. Returns ``{"rows": [{model,
    set_seconds, full_seconds, set_networks, full_networks, ratio}], "differences": [...]}`` for the
    architectures both results trained; ``ratio`` = ``full_seconds / set_seconds`` (how many times
    less training time the set needs), the ``*_seconds`` being per network.
    """
    if (baseline.set or {}).get("method") != "full-dataset":
        raise ConfigError(f"the baseline result is not a full-training-set result (its set is "
                          f"{(baseline.set or {}).get('method')!r}); make one with `tinyset baseline --json FILE`")
    if baseline.dataset != result.dataset:
        raise ConfigError(f"the baseline was measured on {baseline.dataset}, the set is of {result.dataset}")
    rows = []
    for row in result.results:
        full = next((r for r in baseline.results if r.model == row.model), None)
        if full is None:
            continue
        if row.train_seconds <= 0 or full.train_seconds <= 0:
            raise ConfigError(f"{row.model}: a result without a recorded training time (train_seconds "
                              f"{row.train_seconds} and {full.train_seconds}); re-run it with this tinyset")
        set_s, full_s = row.train_seconds / len(row.accuracies), full.train_seconds / len(full.accuracies)
        rows.append({"model": row.model, "set_seconds": set_s, "full_seconds": full_s,
                     "set_networks": len(row.accuracies), "full_networks": len(full.accuracies),
                     "ratio": full_s / set_s})
    if not rows:
        raise ConfigError(f"the baseline trained {', '.join(r.model for r in baseline.results)} and the set "
                          f"{', '.join(r.model for r in result.results)}: no architecture in common")
    return {"rows": rows, "differences": _runtime_differences(result, baseline)}


def format_time_saved(saved: Mapping[str, Any], baseline_name: str = "the baseline") -> str:
    """:func:`time_saved` as text lines, one per architecture."""
    lines = [f"training time against {baseline_name} (full training set), per network (ensemble time / networks):"]
    for r in saved["rows"]:
        lines.append(f"  {r['model']}: {r['full_seconds']:.1f} s on the full set ({r['full_networks']} networks "
                     f"at once) / {r['set_seconds']:.1f} s on this set ({r['set_networks']} at once) = "
                     f"{r['ratio']:.1f}x less training time")
    if saved["differences"]:
        lines.append(f"  note: the two ran differently ({'; '.join(saved['differences'])}); the ratio mixes machines")
    return "\n".join(lines)


__all__ = ["time_saved", "format_time_saved"]
