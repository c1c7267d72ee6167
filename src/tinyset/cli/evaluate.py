"""``tinyset evaluate``: train fresh networks on a synthetic-set file and report their test accuracy
(or, with ``--split validation``, their accuracy on images held out of the training split)."""
from __future__ import annotations

import argparse
from typing import Any

from tinyset.cli.common import (add_data_options, add_force, add_runtime_options, check_distinct, check_json_out,
                                evaluation_bar, load_split, load_synset, number, parse_models, print_evaluation,
                                write_result_json)

HELP = "train fresh networks on a synthetic-set file, report test accuracy (or validation accuracy: --split validation)"

#: one wording of the schedule, used by every help text (it is what Protocol.train_epochs/decay_epoch do)
SCHEDULE_HELP = ("training epochs (default: the protocol's); the dsa and noaug protocols follow upstream's "
                 "evaluate_synset: epochs+1 passes over the data, lr x0.1 from pass epochs//2+3 on "
                 "(pass 503 of 1001 for 1000 epochs)")


def add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="convnet",
                   help="comma-separated architectures to train on the set (default: convnet; see `tinyset models`)")
    p.add_argument("--protocol", default=None,
                   help="evaluation preset: dsa (1000 epochs, DSA; default of evaluate), noaug (300 epochs), "
                        "quick (smoke test), fulldata (6 epochs, default of baseline), fulldata-long "
                        "(16 epochs, DSA, 3 nets), dsa-learned-lr (dsa with the set's learned lr, for MTT sets), "
                        "dsa-early (dsa with early stopping on a validation split of the training data), dc (the DC paper's "
                        "evaluation of DC-made sets: 1000 epochs with its crop/scale/rotate/noise augmentation); krr / "
                        "krr-random: kernel ridge regression on the set with features of networks trained briefly on "
                        "it / freshly initialised (no SGD classifier; results never mixed with the others); frepo: FRePo's evaluation "
                        "(Adam 3e-4 with warm-up and cosine, squared error on the set's learned regression targets or "
                        "centred one-hot rows, 1000-5000 steps by set size; use --models convnet-frepo (FRePo's "
                        "network) or convnet-nn; never in one table with the dsa protocols)")
    p.add_argument("--num-models", type=number(int, low=1), default=None,
                   help="networks per architecture (default: protocol's)")
    p.add_argument("--epochs", type=number(int, low=1), default=None, help=SCHEDULE_HELP)
    p.add_argument("--lr", type=number(float, low=0, low_open=True), default=None,
                   help="learning rate (default: the protocol's: 0.01, 3e-4 for frepo)")
    p.add_argument("--batch-size", type=number(int, low=1), default=None, help="training batch size (default: the protocol's, 256; 500 for frepo)")
    p.add_argument("--momentum", type=number(float, low=0, high=1, high_open=True), default=None,
                   help="SGD momentum (default: 0.9; unused by Adam protocols such as frepo)")
    p.add_argument("--weight-decay", type=number(float, low=0), default=None, help="weight decay (default: the protocol's, 5e-4; 0 for frepo)")
    p.add_argument("--augment", choices=("dsa", "dc", "none"), default=None,
                   help="train-time augmentation: dsa (DSA), dc (the DC paper's crop/scale/rotate/noise, one op per "
                        "image), none (default: the protocol's)")
    p.add_argument("--dc-strategy", default=None, metavar="OPS",
                   help="with --augment dc / --protocol dc: ops joined by '_' of crop, scale, rotate, noise (default: the "
                        "DC paper's rule: crop_noise for BatchNorm networks, crop_scale_rotate for MNIST)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the training step (auto: for long runs on CPU)")
    add_early_stop_options(p)
    p.add_argument("--json", dest="json_out", default=None, help="write the results as JSON to this file")
    add_force(p, "--json file")


def add_early_stop_options(p: argparse.ArgumentParser) -> None:
    """Early stopping on a validation split (the protocol's ``early_stop_patience`` and friends)."""
    p.add_argument("--early-stop-patience", type=number(int, low=1), default=None, metavar="EPOCHS",
                   help="stop a network once its validation accuracy has not risen for this many epochs and test "
                        "the weights of its best validation epoch (default: the protocol's; off except in dsa-early). "
                        "The validation split is held out of the real training split, never the test split")
    p.add_argument("--val-every", type=number(int, low=1), default=None, metavar="EPOCHS",
                   help="with early stopping: validate every this many epochs (default: the protocol's, 10)")
    p.add_argument("--val-per-class", type=number(int, low=1), default=None, metavar="N",
                   help="with early stopping or --split validation: training images per class held out for "
                        "validation (default: the protocol's, 100)")


def protocol_from(args: argparse.Namespace, default: str) -> Any:
    from tinyset.evaluate import Protocol

    return Protocol.preset(args.protocol or default, num_models=args.num_models, epochs=args.epochs,
                           lr=args.lr, batch_size=args.batch_size, augment=args.augment,
                           momentum=args.momentum, weight_decay=args.weight_decay,
                           dc_strategy=args.dc_strategy, precision=args.runtime.precision,
                           compile={"auto": None, "on": True, "off": False}[args.compile],
                           early_stop_patience=args.early_stop_patience, val_every=args.val_every,
                           val_per_class=args.val_per_class)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a .safetensors synthetic-set file")
    add_eval_options(p)
    p.add_argument("--teacher", default=None, metavar="EXPERTS_DIR[:EPOCH]",
                   help="the 'teacher' label regime: relabel every image once with the softmax of expert 0 of a "
                        "folder made by `tinyset experts` (default epoch: its last) and train on those soft labels "
                        "(knowledge distillation); without it the set's own labels are used (hard, or soft labels "
                        "the method learned). Any set works: for a baseline under the same regime, `tinyset select "
                        "--method random ...` then evaluate the subset with the same --teacher")
    p.add_argument("--teacher-temperature", type=number(float, low=0, low_open=True), default=1.0,
                   help="temperature T of the teacher's softmax(logits / T) (default: 1)")
    p.add_argument("--split", choices=("test", "validation"), default="test",
                   help="the real images the trained networks are scored on: test (default) or validation, images "
                        "held out of the training split (--val-per-class per class, seeded by --seed, never one of "
                        "a coreset's own images). Choose settings by validation accuracy, never by test accuracy; "
                        "the two are never put in one table")
    p.add_argument("--baseline-json", default=None, metavar="FILE",
                   help="a `tinyset baseline --json` result of the same dataset: print the training time saved, "
                        "full-set training time per network / this set's (both measured wall times)")
    add_data_options(p)
    add_runtime_options(p)


def run(args: argparse.Namespace) -> int:
    from tinyset.evaluate import check_split, evaluate_synset

    models = parse_models(args.models)
    if args.protocol is not None and registered_evaluator(args.protocol) is not None:
        return run_registered(args, models, registered_evaluator(args.protocol))
    protocol = protocol_from(args, "dsa")
    check_split(args.split, protocol.early_stopping)
    check_distinct("--json", args.json_out, "the input", args.file)
    check_distinct("--json", args.json_out, "--baseline-json", args.baseline_json)
    check_json_out(args)
    baseline = load_baseline(args.baseline_json)
    synset = load_synset(args.file)
    teacher = load_teacher(args, synset)
    test = load_split(args, synset.info.name, "test") if args.split == "test" else None
    # early stopping validates (and --split validation scores) on images held out of the real
    # training split, never the test split
    need_train = protocol.early_stopping or args.split == "validation"
    train = load_split(args, synset.info.name, "train") if need_train else None
    res = run_with_bar(args, models, protocol, lambda **bar: evaluate_synset(
        synset, test, models, protocol, seed=args.seed, device=args.runtime.device, teacher=teacher,
        train=train, split=args.split, **bar),
        f"{args.file}: {len(synset)} images of {synset.info.name}, method {synset.meta.get('method')}"
        + ("" if args.split == "test" else ", scored on the validation split"),
        file=str(args.file))
    if baseline is not None:
        from tinyset.evaluate.timing import format_time_saved, time_saved

        print(format_time_saved(time_saved(res, baseline), args.baseline_json))
    return 0


def registered_evaluator(name: str) -> Any:
    """The non-SGD protocol registered as ``name`` (``krr``, ...), or None for a preset name."""
    from tinyset.evaluate.protocol import EVALUATORS

    return EVALUATORS.get(name) if name in EVALUATORS else None


def run_registered(args: argparse.Namespace, models: list[str], evaluator: Any) -> int:
    """``--protocol NAME`` of :data:`tinyset.evaluate.protocol.EVALUATORS`: evaluate, print, write JSON."""
    from tinyset.cli.common import scored_on_line
    from tinyset.evaluate import Protocol, format_table, scored_split

    check_json_out(args)
    check_distinct("--json", args.json_out, "the input", args.file)
    synset = load_synset(args.file)
    name = synset.info.name
    test = load_split(args, name, "test") if args.split == "test" else None
    train = load_split(args, name, "train") if args.split == "validation" else None
    per_class = args.val_per_class or Protocol().val_per_class
    images, scored_on = scored_split(synset, test, train, args.split, per_class, args.seed)
    res = evaluator(synset, images, models, args.seed, args.runtime.device, args.runtime.precision, args.num_models)
    res.file, res.runtime, res.scored_on = str(args.file), args.runtime.to_dict(), scored_on
    print(format_table(res.results, title=f"{args.file}: {len(synset)} images of {name}, method "
                                          f"{synset.meta.get('method')}", split=args.split))
    if args.split != "test":
        print(scored_on_line(scored_on))
    print(f"protocol {res.protocol['name']}: {res.protocol['source']}")
    write_result_json(args, res)
    return 0


def load_baseline(path: str | None) -> Any:
    """The ``--baseline-json`` result (a full-training-set evaluation), read and checked before any
    work; None without the flag."""
    if path is None:
        return None
    import json

    from tinyset.errors import ArtifactError
    from tinyset.results import EvaluationResult, result_from_dict

    try:
        data = json.loads(open(path, encoding="utf-8").read())
    except OSError as exc:
        raise ArtifactError(f"--baseline-json {path}: cannot be read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"--baseline-json {path}: not valid JSON ({exc}); expected the file written by "
                            f"`tinyset baseline --json`") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"--baseline-json {path}: not a tinyset result (a JSON {type(data).__name__})")
    try:
        res = result_from_dict(data)
    except TypeError as exc:
        raise ArtifactError(f"--baseline-json {path}: malformed result ({exc})") from None
    if not isinstance(res, EvaluationResult) or (res.set or {}).get("method") != "full-dataset":
        what = data.get("kind") if not isinstance(res, EvaluationResult) else (res.set or {}).get("method")
        raise ArtifactError(f"--baseline-json {path}: not a full-training-set result ({what!r}); expected the "
                            f"file written by `tinyset baseline --json`")
    return res


def load_teacher(args: argparse.Namespace, synset: Any) -> Any:
    """The ``--teacher`` network (checked against the set), or None without the flag."""
    if getattr(args, "teacher", None) is None:
        return None
    from tinyset.evaluate import Teacher

    teacher = Teacher.from_experts(args.teacher, args.teacher_temperature, args.runtime.device)
    teacher.check(synset.info, f"the set {args.file}")
    return teacher


def run_with_bar(args: argparse.Namespace, models: list[str], protocol: Any, call: Any, title: str,
                 file: str | None = None) -> Any:
    """Run ``call(progress=..., step_progress=...)`` under the epoch bar, then print and write the result."""
    on_epoch, on_step, close = evaluation_bar(models, protocol.train_epochs)
    try:
        res = call(progress=on_epoch, step_progress=on_step)
    finally:
        close()
    res.file = file
    res.runtime = args.runtime.to_dict()
    print_evaluation(res, title)
    write_result_json(args, res)
    return res
