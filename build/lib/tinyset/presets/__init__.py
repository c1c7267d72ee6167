"""Preset files (JSON data, each with its source), installed as the package ``tinyset.presets``."""
