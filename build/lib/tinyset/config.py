"""Preset files: hyper-parameters as data (JSON, each with its ``source``), found by name."""
from __future__ import annotations

import json
from importlib import resources
from typing import Any

from tinyset.errors import ConfigError


def _folder(kind: str):
    return resources.files("tinyset.presets").joinpath(kind)


def list_presets(kind: str) -> list[str]:
    """Names of the presets of one kind (``evaluate``, ``distill``)."""
    folder = _folder(kind)
    if not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_preset(kind: str, name: str) -> dict[str, Any]:
    """The preset ``name`` of ``kind`` as a dict; a clear error lists the known ones."""
    path = _folder(kind).joinpath(f"{name}.json")
    if not path.is_file():
        known = ", ".join(list_presets(kind)) or "none"
        raise ConfigError(f"no {kind} preset named {name!r}; known: {known}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"preset file {path} is not valid JSON: {exc}") from None
    if "source" not in data:
        raise ConfigError(f"preset file {path} has no 'source' field")
    return data
