"""Distillation methods, one file each, sharing one loop (:mod:`tinyset.methods.loop`).

Every method is a :class:`tinyset.methods.base.Distiller` registered in :data:`METHODS`; adding one
is one new file with one registration (and its import below).
"""
from __future__ import annotations

from tinyset.registry import Registry

METHODS: Registry = Registry("method")

from tinyset.methods import datadam, dc, dm, gan, krr, mtt, pad  # noqa: E402,F401  (each module registers itself)

__all__ = ["METHODS"]
