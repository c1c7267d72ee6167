"""``tinyset select``: pick real images per class with a coreset method or a named recipe."""
from __future__ import annotations

import argparse
from pathlib import Path

from tinyset.cli.common import (add_data_options, add_force, add_runtime_options, check_distinct, check_json_out,
                                default_run_name, load_split, number, positive,
                                write_result_json)
from tinyset.errors import ConfigError

HELP = "pick ipc real images per class with a coreset method or a recipe (--recipe mps2u, ...)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tinyset.select import SELECTORS
    from tinyset.select.recipes import RECIPES

    p.add_argument("--method", default=None, choices=SELECTORS.names(), help="the selector (or give --recipe)")
    p.add_argument("--recipe", default=None, choices=RECIPES.names(),
                   help="a named pipeline: a selector with option values (`--list-recipes` shows them)")
    p.add_argument("--list-recipes", action="store_true", help="list the recipes and what each runs, then exit")
    p.add_argument("--help-options", action="store_true",
                   help="list the options of --method (or of --recipe's selector, with the recipe's values) and exit")
    p.add_argument("--dataset", default=None, help="dataset name (see `tinyset datasets`) or imagefolder:PATH")
    p.add_argument("--ipc", type=number(int, low=1), default=None, help="images per class")
    p.add_argument("--size", type=number(int, low=1), default=None,
                   help="total number of images instead of --ipc, split evenly over the classes (must be a "
                        "multiple of the class count)")
    p.add_argument("--config", dest="config_file", default=None, metavar="FILE.toml",
                   help="selector options, key = value lines (see --help-options)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="one selector option (repeatable), e.g. --set estimator=knn; wins over --config and the recipe")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="checkpoint of an iterative selector such as rl (default: OUT with the suffix "
                        ".checkpoint.safetensors)")
    p.add_argument("--checkpoint-every", type=number(int, low=1), default=1,
                   help="iterations between checkpoints of an iterative selector (default: 1)")
    p.add_argument("--resume", action="store_true", help="continue an iterative selector from its checkpoint "
                                                         "(bit-exact on CPU)")
    p.add_argument("--out", default=None,
                   help="output .safetensors file (default: runs/METHOD_DATASET_ipcK_seedS.safetensors)")
    p.add_argument("--json", dest="json_out", default=None,
                   help="also write the selection (indices, settings with their sources, time) as JSON to this file")
    add_force(p, "--out / --json file (and the checkpoint of a new run)")
    add_data_options(p)
    add_runtime_options(p)


def describe_options(method: str | None, recipe: str | None, dataset: str | None, ipc: int | None) -> str:
    """The options of a selector (name, default, allowed, meaning) and, with a recipe, its rows."""
    from tinyset.select import SELECTORS, options_class
    from tinyset.select.recipes import RECIPES

    lines = []
    if recipe is not None:
        rec = RECIPES.get(recipe)
        if method is not None and SELECTORS._key(method) != SELECTORS._key(rec.selector):
            raise ConfigError(f"recipe {RECIPES._key(recipe)} runs the {rec.selector} selector, not {method}")
        method = rec.selector
        lines.append(f"recipe {RECIPES._key(recipe)}: {rec.summary}\nits rows (later rows override):")
        for row in rec.rows:
            where = f"datasets {','.join(row.datasets)}" if row.datasets else "all datasets"
            lines.append(f"  [{where}] {dict(row.values)}\n      source: {row.source}")
        if dataset is not None:
            lines.append(f"values for {dataset}: {rec.values(dataset, ipc or 1)}")
        lines.append("")
    if method is None:
        raise ConfigError("--help-options needs --method or --recipe")
    cls = options_class(SELECTORS.get(method))
    lines.append(f"{SELECTORS._key(method)}: {SELECTORS.help(method)}\n\noptions (name, default, allowed, meaning; "
                 f"set with --set KEY=VALUE or --config FILE.toml):")
    lines.append(cls.describe() or "  (none)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from tinyset.cli.distill import check_config_file
    from tinyset.data import get_spec
    from tinyset.files import check_output_dir, check_output_file
    from tinyset.hparams import parse_sets
    from tinyset.select import RunControl, ipc_from_size, resolve_options, select
    from tinyset.select.recipes import ELSEWHERE, RECIPES

    if args.list_recipes:
        for name in RECIPES.names():
            print(f"{name:<12} selector {RECIPES.get(name).selector}: {RECIPES.help(name)}")
        for name, how in ELSEWHERE.items():
            print(f"{name:<12} {how}")
        print("\n`tinyset select --recipe NAME --help-options` lists a recipe's values and their sources")
        return 0
    if args.help_options:
        print(describe_options(args.method, args.recipe, args.dataset, args.ipc))
        return 0
    if args.method is None and args.recipe is None:
        raise ConfigError("give --method NAME or --recipe NAME (see --list-recipes)")
    if args.dataset is None:
        raise ConfigError("--dataset is required (e.g. --dataset mnist)")
    if (args.ipc is None) == (args.size is None):
        raise ConfigError("give exactly one of --ipc (images per class) and --size (total images, class-balanced)")
    positive("--ipc", args.ipc)
    ipc = args.ipc
    if args.size is not None:
        ipc = ipc_from_size(args.size, _num_classes(args, get_spec), args.dataset)
    sets = parse_sets(args.sets)
    check_config_file(args.config_file)
    # every option is checked before any data is read or any file written
    key, _ = resolve_options(args.method, args.dataset, ipc, recipe=args.recipe, config_file=args.config_file,
                             sets=sets)
    label = args.recipe or key
    if args.out is not None and not args.out.strip():
        raise ConfigError("--out '': empty path; expected the .safetensors file to write (or leave --out out "
                          "for the default)")
    default = f"runs/{default_run_name(label, args.dataset, f'ipc{ipc}', f'seed{args.seed}')}.safetensors"
    out = Path(args.out if args.out is not None else default)
    # an earlier run's checkpoint is named first: it is what --resume continues
    control, stale = None, None
    if _iterative(key):
        ckpt = Path(args.checkpoint) if args.checkpoint else out.with_name(out.stem + ".checkpoint.safetensors")
        check_distinct("--checkpoint", ckpt, "--out", out)
        if args.resume and not ckpt.is_file():
            raise ConfigError(f"--resume: no checkpoint at {ckpt}; drop --resume to start a new selection")
        if not args.resume and ckpt.exists():
            if not args.force:
                raise ConfigError(f"{ckpt} holds the checkpoint of an earlier selection; pass --resume to continue "
                                  f"it or --force to start again")
            stale = ckpt  # removed once every other check passed
        control = RunControl(ckpt, args.resume, args.checkpoint_every)
    elif args.resume or args.checkpoint:
        raise ConfigError(f"selector {key} runs in one pass: --checkpoint and --resume apply to iterative "
                          f"selectors only")
    if args.out is None and not out.parent.is_dir():
        check_output_dir(out.parent, flag="--out")  # the default folder is made once every check passed
    else:
        check_output_file(args.out if args.out is not None else out, force=args.force or args.resume, flag="--out")
    check_distinct("--json", args.json_out, "--out", out)
    check_json_out(args)
    if stale is not None:
        stale.unlink()
    if args.out is None:
        out.parent.mkdir(parents=True, exist_ok=True)
    rt = args.runtime
    train = load_split(args, args.dataset, "train")
    res = select(args.method, train, ipc, seed=args.seed, device=rt.device, recipe=args.recipe,
                 config_file=args.config_file, sets=sets, run=control)
    res.synset.save(out)
    res.file = str(out)
    record = res.synset.meta.get("selector_record") or {}
    extra = (f"; best validation reward {record['best_reward']:.4f} at iteration {record['best_iteration']} of "
             f"{record['iterations']}" if "best_reward" in record else "")
    print(f"selected {len(res.synset)} images ({ipc} per class) of {args.dataset} with {label} "
          f"in {res.seconds:.1f} s{extra}: {out}")
    write_result_json(args, res)
    return 0


def _iterative(key: str) -> bool:
    """Whether a selector takes ``run=`` (checkpoints, resume)."""
    import inspect

    from tinyset.select import SELECTORS

    return "run" in inspect.signature(SELECTORS.get(key)).parameters


def _num_classes(args: argparse.Namespace, get_spec) -> int:
    """The class count of ``--dataset``: from its spec when it declares one, else from its training split."""
    info = getattr(get_spec(args.dataset), "info", None)
    if info is not None:
        return info.num_classes
    return load_split(args, args.dataset, "train").info.num_classes


__all__ = ["add_arguments", "run", "describe_options", "HELP"]
