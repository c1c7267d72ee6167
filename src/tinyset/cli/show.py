"""``tinyset show``: a synthetic set as an image grid, one row per class, and what its labels are.

Soft labels are filed under their argmax class. A set that carries a ZCA transform is shown
un-whitened (its images in the dataset's normalised space, then denormalised to pixels).
"""
from __future__ import annotations

import argparse
from typing import Any

from tinyset.cli.common import add_force, check_distinct, load_synset, number

HELP = "save a synthetic set as an image grid (one row per class); print its label kind and regime"


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
    for line in describe_labels(synset):
        print(line)
    return 0


def describe_labels(synset: Any) -> list[str]:
    """Lines saying what the set's labels are, under which label regime ``tinyset evaluate`` trains on
    them, and whether the images are ZCA-whitened."""
    from tinyset.results import label_regime

    if synset.is_soft:
        lines = [f"labels: soft ({synset.num_classes} probabilities per image, filed under their argmax); "
                 f"label regime: {label_regime(True, False)}"]
    else:
        lines = [f"labels: hard (one class per image); label regime: {label_regime(False, False)}"]
    if synset.lr is not None:
        lines.append(f"learned lr: {synset.lr:.6g}; protocols with lr null (dsa-learned-lr) train with it: label "
                     f"regime {label_regime(synset.is_soft, True)}")
    if synset.zca is not None:
        lines.append(f"images: ZCA-whitened (eps {synset.zca.eps:g}, fitted on {synset.zca.num_images} images); "
                     f"shown un-whitened; evaluation whitens the test images with the same transform")
    return lines
