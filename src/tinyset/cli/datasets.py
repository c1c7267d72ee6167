"""``tinyset datasets``: the known datasets and whether their files are found."""
from __future__ import annotations

import argparse
from pathlib import Path

from tinyset.cli.common import data_root

HELP = "list known datasets and whether their files are found"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None, help="folder to look in (default: $TINYSET_DATA or ./data)")


def run(args: argparse.Namespace) -> int:
    from tinyset.data import DATASET_FAMILIES, DATASETS, default_data_root, get_spec

    root = data_root(args) or default_data_root()
    print(f"data root: {root.resolve()}")
    header = f"{'name':<14} {'image':<9} {'classes':>7}  status"
    print(header)
    print("-" * len(header))
    for name in DATASETS.names():
        spec = get_spec(name)
        info = spec.info
        files = spec.files(root)
        missing = [f for f in files if not (f.exists() or Path(str(f) + ".gz").exists()
                                            or (str(f).endswith(".gz") and Path(str(f)[:-3]).exists()))]
        if not files:
            status = "built in (no download)"
        elif missing:
            status = f"missing {len(missing)} of {len(files)} files (e.g. {missing[0]}); --download fetches them"
        else:
            status = f"found in {files[0].parent}"
        size = f"{info.channels}x{info.image_size[0]}x{info.image_size[1]}"
        print(f"{name:<14} {size:<9} {info.num_classes:>7}  {status}")
    for family in DATASET_FAMILIES.names():
        print(f"{family + ':PATH':<14} {DATASET_FAMILIES.help(family)}")
    return 0
