"""``tinyset export``: a synthetic set as an ImageFolder of PNGs or an .npz."""
from __future__ import annotations

import argparse

HELP = "export a synthetic set as an ImageFolder of PNGs or an .npz"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a .safetensors synthetic-set file")
    p.add_argument("--format", choices=("imagefolder", "npz"), required=True)
    p.add_argument("--out", required=True, help="output folder (imagefolder) or file (npz)")
    p.add_argument("--force", "--overwrite", dest="force", action="store_true",
                   help="replace an existing output (--overwrite is the older name)")


def run(args: argparse.Namespace) -> int:
    from tinyset.export import export_imagefolder, export_npz
    from tinyset.files import check_output_dir, check_output_file
    from tinyset.synset import SyntheticSet

    if args.format == "imagefolder":
        check_output_dir(args.out, flag="--out", must_be_empty=not args.force)
    else:
        check_output_file(args.out, force=args.force, flag="--out")
    synset = SyntheticSet.load(args.file)
    fn = export_imagefolder if args.format == "imagefolder" else export_npz
    out = fn(synset, args.out, overwrite=args.force)
    print(f"exported {len(synset)} images as {args.format}: {out}")
    return 0
