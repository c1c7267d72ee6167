"""``tinyset select``: pick ipc real images per class with a coreset method."""
from __future__ import annotations

import argparse
from pathlib import Path

from tinyset.cli.common import (add_data_options, add_force, add_runtime_options, check_distinct, check_json_out,
                                default_run_name, load_split, number, positive,
                                write_result_json)
from tinyset.errors import ConfigError

HELP = "pick ipc real images per class with a coreset method"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tinyset.select import SELECTORS

    p.add_argument("--method", required=True, choices=SELECTORS.names())
    p.add_argument("--dataset", required=True, help="dataset name (see `tinyset datasets`) or imagefolder:PATH")
    p.add_argument("--ipc", type=number(int, low=1), required=True, help="images per class")
    p.add_argument("--out", default=None,
                   help="output .safetensors file (default: runs/METHOD_DATASET_ipcK_seedS.safetensors)")
    p.add_argument("--json", dest="json_out", default=None,
                   help="also write the selection (indices, settings, time) as JSON to this file")
    add_force(p, "--out / --json file")
    add_data_options(p)
    add_runtime_options(p)


def run(args: argparse.Namespace) -> int:
    from tinyset.files import check_output_dir, check_output_file
    from tinyset.select import select

    positive("--ipc", args.ipc)
    if args.out is not None and not args.out.strip():
        raise ConfigError("--out '': empty path; expected the .safetensors file to write (or leave --out out "
                          "for the default)")
    default = f"runs/{default_run_name(args.method, args.dataset, f'ipc{args.ipc}', f'seed{args.seed}')}.safetensors"
    out = Path(args.out if args.out is not None else default)
    if args.out is None and not out.parent.is_dir():
        check_output_dir(out.parent, flag="--out")  # the default folder is made once every check passed
    else:
        check_output_file(args.out if args.out is not None else out, force=args.force, flag="--out")
    check_distinct("--json", args.json_out, "--out", out)
    check_json_out(args)
    if args.out is None:
        out.parent.mkdir(parents=True, exist_ok=True)
    rt = args.runtime
    train = load_split(args, args.dataset, "train")
    res = select(args.method, train, args.ipc, seed=args.seed, device=rt.device)
    res.synset.save(out)
    res.file = str(out)
    print(f"selected {len(res.synset)} images ({args.ipc} per class) of {args.dataset} with {args.method} "
          f"in {res.seconds:.1f} s: {out}")
    write_result_json(args, res)
    return 0
