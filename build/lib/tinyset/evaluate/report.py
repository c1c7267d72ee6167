"""Results as a readable table and as JSON."""
from __future__ import annotations

from typing import Any, Sequence


def format_table(rows: Sequence[dict[str, Any]], title: str = "") -> str:
    """Rows with ``model``, ``mean``, ``std``, ``accuracies``, ``seconds`` -> aligned text table."""
    head = ("model", "test acc (%)", "models", "train s/model")
    body = []
    for r in rows:
        body.append((r["model"], f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}", str(len(r["accuracies"])),
                     f"{r['seconds_per_model']:.1f}"))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    out = [title] if title else []
    out += [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(out)
