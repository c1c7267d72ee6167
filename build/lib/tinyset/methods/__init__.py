"""Distillation methods, one file each, sharing one training loop (:mod:`tinyset.methods.runner`).

Every method is registered in :data:`METHODS` as a class with the interface of
:class:`tinyset.methods.base.Method`.
"""
from __future__ import annotations

from tinyset.registry import Registry

METHODS: Registry = Registry("method")

from tinyset.methods import dc, dm  # noqa: E402,F401  (each module registers itself)

__all__ = ["METHODS"]
