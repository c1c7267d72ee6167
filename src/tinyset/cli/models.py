"""``tinyset models``: the registered network architectures."""
from __future__ import annotations

import argparse

HELP = "list the registered network architectures"


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from tinyset.models import MODELS

    for name in MODELS.names():
        print(f"{name:<16} {MODELS.help(name)}")
    return 0
