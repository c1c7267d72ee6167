"""``tinyset show``: a synthetic set as an image grid, one row per class."""
from __future__ import annotations

import argparse

from tinyset.cli.common import add_force, check_distinct, load_synset, number

HELP = "save a synthetic set as an image grid (one row per class)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a .safetensors synthetic-set file")
    p.add_argument("--out", required=True, help="output image: .png, .jpg/.jpeg, .bmp, .gif, .webp or .tiff "
                                                "(the format follows the suffix)")
    p.add_argument("--upscale", type=number(int, low=1), default=None,
                   help="pixel repeat factor (default: to at least 32 px per image; the grid is kept under "
                        "the size limit of tinyset.viz)")
    add_force(p, "image")


def run(args: argparse.Namespace) -> int:
    from tinyset.files import check_output_file
    from tinyset.viz import check_image_suffix, save_grid

    check_distinct("--out", args.out, "the input", args.file)
    check_output_file(args.out, force=args.force, flag="--out")
    check_image_suffix(args.out)
    synset = load_synset(args.file)
    out = save_grid(synset, args.out, upscale=args.upscale)
    print(f"{len(synset)} images, one row per class: {out}")
    return 0
