"""Distillation methods, one file each, sharing one training loop (:mod:`tinyset.methods.runner`).

Every method is registered in :data:`METHODS` as a class with the interface of
:class:`tinyset.methods.base.Method`.
"""
from __future__ import annotations

from tinyset.registry import Registry

METHODS: Registry = Registry("method")

for _mod in ("dm", "dc"):
    try:
        __import__(f"tinyset.methods.{_mod}")
    except ModuleNotFoundError as _exc:  # pragma: no cover - module being written
        if _exc.name != f"tinyset.methods.{_mod}":
            raise

__all__ = ["METHODS"]
