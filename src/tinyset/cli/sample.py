"""``tinyset sample``: a synthetic set drawn from the generator file of a GAN run, at any ipc,
optionally filtered, without training the GAN again."""
from __future__ import annotations

import argparse

from tinyset.cli.common import (add_data_options, add_force, add_runtime_options, check_distinct, check_json_out,
                                load_split, number, write_result_json)

HELP = "draw a synthetic set from a GAN run's generator file (any ipc, optional filter) without retraining"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tinyset.methods.gan import SAMPLE_FILTERS, FilterSettings
    from tinyset.select.mi import ESTIMATORS

    d = FilterSettings()
    p.add_argument("generator", help="a generator file (RUN/generator.safetensors of `tinyset distill --method gan`)")
    p.add_argument("--ipc", type=number(int, low=1), required=True, help="images per class")
    p.add_argument("--out", required=True, help="output .safetensors synthetic-set file")
    p.add_argument("--sample-seed", type=number(int, low=0, high=2**63 - 1), default=None,
                   help="seed of the latents (default: the file's sample seed; with the run's ipc and filter this "
                        "gives the run's own set)")
    p.add_argument("--filter", choices=SAMPLE_FILTERS, default=d.kind,
                   help="keep the best of --candidates samples per image: none; discriminator (highest D(x, y) of "
                        "the run's discriminator: from the file, or from an older file's run checkpoint of the same "
                        "iteration); classifier (highest log p(y|x) of a "
                        "classifier trained briefly on real training images; reads the dataset); herding (the "
                        "candidates whose mean embedding in that classifier's features comes closest to its real "
                        "training images' class mean, picked one at a time, so a class keeps its variety; reads the "
                        "dataset); mi (highest "
                        "pointwise mutual information with the label, scored as `tinyset select --method mi` "
                        "scores real images, by a scorer fitted on real training images; reads the dataset)")
    p.add_argument("--candidates", type=number(int, low=1, high=1000), default=d.candidates,
                   help=f"samples generated per kept image when filtering (default: {d.candidates})")
    p.add_argument("--filter-model", default=d.model,
                   help=f"architecture of the filter classifier (default: {d.model}; see `tinyset models`)")
    p.add_argument("--filter-epochs", type=number(int, low=1, high=10000), default=d.epochs,
                   help=f"epochs of the filter classifier (default: {d.epochs})")
    p.add_argument("--filter-per-class", type=number(int, low=1), default=d.per_class,
                   help=f"real training images per class the filter classifier trains on (default: {d.per_class})")
    p.add_argument("--mi-estimator", choices=ESTIMATORS, default=d.estimator,
                   help="--filter mi: the p(y|x) estimator, probe (calibrated logistic probe) or knn (vote of the "
                        f"nearest real training images) (default: {d.estimator})")
    p.add_argument("--filter-seed", type=number(int, low=0, high=2**63 - 1), default=None,
                   help="seed of the filter classifier (its images and weights; classifier and herding) or of the mi "
                        "scorer (default: the run's, stored in the file, else 0)")
    p.add_argument("--dataset", default=None,
                   help="the training split the classifier, herding and mi filters learn from (default: the "
                        "dataset named in the file)")
    p.add_argument("--json", dest="json_out", default=None,
                   help="also write what was sampled (settings, time) as JSON (kind sampling of the results schema)")
    add_force(p, "--out / --json file")
    add_data_options(p)
    add_runtime_options(p, seed=False)  # its seeds are --sample-seed and --filter-seed


def run(args: argparse.Namespace) -> int:
    from tinyset.errors import ConfigError
    from tinyset.files import check_output_file
    from tinyset.api import sample
    from tinyset.methods.gan import CLASSIFIER_FILTERS, REAL_DATA_FILTERS, load_discriminator, read_generator_header
    from tinyset.models import MODELS

    check_distinct("--out", args.out, "the generator file", args.generator)
    check_output_file(args.out, force=args.force, flag="--out")
    check_distinct("--json", args.json_out, "--out", args.out)
    check_json_out(args)
    _, info = read_generator_header(args.generator)
    if args.filter == "discriminator":
        load_discriminator(args.generator)  # refused now, before any work, if the run has none to give
    if args.filter in CLASSIFIER_FILTERS and args.filter_model not in MODELS:
        raise ConfigError(f"--filter-model {args.filter_model!r} is not a registered architecture; known: "
                          f"{', '.join(MODELS.names())}")
    train = load_split(args, args.dataset or info.name, "train") if args.filter in REAL_DATA_FILTERS else None
    rt = args.runtime
    res = sample(args.generator, args.ipc, filter=args.filter, candidates=args.candidates,
                 sample_seed=args.sample_seed, filter_seed=args.filter_seed, train=train, device=rt.device,
                 precision=rt.precision, model=args.filter_model, epochs=args.filter_epochs,
                 per_class=args.filter_per_class, estimator=args.mi_estimator)
    res.synset.save(args.out)
    res.file, res.runtime = str(args.out), rt.to_dict()
    how = "" if args.filter == "none" else f", best of {args.candidates} by the {args.filter}"
    print(f"sampled {len(res.synset)} images ({args.ipc} per class) of {info.name} from {args.generator} (iteration "
          f"{res.sampling['generator_iteration']}, sample seed {res.sampling['sample_seed']}{how}) in "
          f"{res.seconds:.1f} s: {args.out}")
    write_result_json(args, res)
    return 0


__all__ = ["add_arguments", "run", "HELP"]
