"""``tinyset export``: a synthetic set as an ImageFolder of PNGs or an .npz."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tinyset.cli.common import check_distinct, load_synset
from tinyset.errors import OutputError

HELP = "export a synthetic set as an ImageFolder of PNGs or an .npz"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a .safetensors synthetic-set file")
    p.add_argument("--format", choices=("imagefolder", "npz"), required=True)
    p.add_argument("--out", required=True, help="output folder (imagefolder) or file (npz)")
    p.add_argument("--force", "--overwrite", dest="force", action="store_true",
                   help="replace an existing output (--overwrite is the older name)")


def _is_export(folder: Path) -> bool:
    """Whether ``folder`` looks like the output of an earlier ``export --format imagefolder``."""
    from tinyset.synset import FORMAT

    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def run(args: argparse.Namespace) -> int:
    from tinyset.export import export_imagefolder, export_npz
    from tinyset.files import check_output_dir, check_output_file

    check_distinct("--out", args.out, "the input", args.file)
    if args.format == "imagefolder":
        folder = check_output_dir(args.out, flag="--out", must_be_empty=not args.force)
        if args.force and folder.is_dir() and any(folder.iterdir()) and not _is_export(folder):
            raise OutputError(f"--out {args.out}: folder is not empty and does not hold an earlier tinyset "
                              f"export (no meta.json of a synthetic set); --force replaces only an export, "
                              f"never other files; choose a new folder")
    else:
        check_output_file(args.out, force=args.force, flag="--out")
    synset = load_synset(args.file)
    fn = export_imagefolder if args.format == "imagefolder" else export_npz
    out = fn(synset, args.out, overwrite=args.force)
    print(f"exported {len(synset)} images as {args.format}: {out}")
    return 0
