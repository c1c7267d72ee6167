"""``tinyset baseline``: the same networks trained on the whole training set."""
from __future__ import annotations

import argparse

from tinyset.cli.common import add_data_options, add_runtime_options, check_json_out, load_split, parse_models
from tinyset.cli.evaluate import add_eval_options, protocol_from, run_with_bar

HELP = "accuracy of the same networks trained on the whole training set"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="dataset name (see `tinyset datasets`) or imagefolder:PATH")
    add_eval_options(p)
    add_data_options(p)
    add_runtime_options(p)


def run(args: argparse.Namespace) -> int:
    from tinyset.evaluate import evaluate_full

    models = parse_models(args.models)
    protocol = protocol_from(args, "fulldata")
    check_json_out(args)
    train = load_split(args, args.dataset, "train")
    test = load_split(args, args.dataset, "test")
    run_with_bar(args, models, protocol, lambda **bar: evaluate_full(
        train, test, models, protocol, seed=args.seed, device=args.runtime.device, **bar),
        f"full training set of {args.dataset} ({len(train)} images)")
    return 0
