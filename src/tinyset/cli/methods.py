"""``tinyset methods [NAME]``: the distillation methods, their settings and published tables."""
from __future__ import annotations

import argparse

HELP = "list distillation methods; with a name, its settings (defaults, ranges), paper table and cpu rule"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", default=None, help="a method to describe")


def run(args: argparse.Namespace) -> int:
    from tinyset.methods import METHODS

    if args.name is None:
        for name in METHODS.names():
            print(f"{name:<8} {METHODS.help(name)}")
        print("\n`tinyset methods NAME` lists a method's settings; set them with --config FILE.toml or --set KEY=VALUE")
        return 0
    cls = METHODS.get(args.name)
    print(f"{METHODS._key(args.name)}: {METHODS.help(args.name)}\n\nsettings (name, default, allowed, meaning):")
    print(cls.Config.describe())
    print("\npaper table (rows apply in order; later rows override):")
    for row in cls.paper.rows:
        where = []
        if row.datasets:
            where.append("datasets " + ",".join(row.datasets))
        if row.ipcs:
            where.append("ipc " + ",".join(map(str, row.ipcs)))
        print(f"  [{'; '.join(where) or 'all'}] {dict(row.values)}\n      source: {row.source}")
    if cls.cpu_rule is not None:
        print(f"\ncpu profile (--preset cpu, the default): {cls.cpu_rule.description}")
    if cls.auto_precision is not None:
        print(f"\nprecision: --precision auto runs {cls.auto_precision} for this method on every device "
              "(an explicit --precision overrides it)")
    return 0
