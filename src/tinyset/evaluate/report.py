"""Results as a readable table (JSON comes from :meth:`tinyset.results.EvaluationResult.to_dict`)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from tinyset.results import ModelScore


def _field(row: ModelScore | Mapping[str, Any], key: str) -> Any:
    return row[key] if isinstance(row, Mapping) else getattr(row, key)


def format_table(rows: Sequence[ModelScore | Mapping[str, Any]], title: str = "") -> str:
    """:class:`~tinyset.results.ModelScore` rows (or dicts with the same keys) -> aligned text table."""
    head = ("model", "test acc (%)", "models", "train s/model")
    body = []
    for r in rows:
        body.append((str(_field(r, "model")), f"{100 * _field(r, 'mean'):.2f} ± {100 * _field(r, 'std'):.2f}",
                     str(len(_field(r, "accuracies"))), f"{_field(r, 'seconds_per_model'):.1f}"))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    out = [title] if title else []
    out += [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(out)
