"""``tinyset experts``: train expert trajectories on a real training set (for ``distill --method mtt``)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinyset.cli.common import add_data_options, add_runtime_options, default_run_name, load_split, number

HELP = ("train expert networks on the real training set and store their parameters after every epoch "
        "(the trajectories `distill --method mtt --set experts=DIR` matches)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="dataset name or imagefolder:PATH")
    p.add_argument("--model", default="convnet",
                   help="architecture of the experts (default: convnet); distill with the same --model")
    p.add_argument("--num-experts", type=number(int, low=1, high=100_000), default=100,
                   help="experts to train (default: 100, as the reference; on a 2-core CPU use a few, e.g. 5)")
    p.add_argument("--epochs", type=number(int, low=1, high=100_000), default=50,
                   help="training epochs per expert; epochs 0..E are stored (default: 50, as the reference)")
    p.add_argument("--lr", type=number(float, low=0, low_open=True), default=0.01,
                   help="SGD learning rate (default: 0.01; no momentum, as the reference)")
    p.add_argument("--weight-decay", type=number(float, low=0), default=0.0, help="weight decay (default: 0)")
    p.add_argument("--batch-size", type=number(int, low=1, high=65536), default=256,
                   help="training batch size (default: 256)")
    p.add_argument("--lr-decay", action="store_true",
                   help="lr x0.1 from epoch E//2+2 on (0-based; the reference's --decay), default: constant lr")
    p.add_argument("--members", type=number(int, low=1, high=1024), default=10,
                   help="experts trained side by side as one batched ensemble (default: 10); a kill loses at "
                        "most the epoch in progress of these")
    p.add_argument("--val-per-class", type=number(int, low=1), default=None,
                   help="training images per class held out to measure validation accuracy after every epoch "
                        "(default: min(100, a tenth of the smallest class))")
    p.add_argument("--dsa-strategy", default=None,
                   help="DSA augmentation while training ('none': off; default: the dataset's strategy)")
    p.add_argument("--zca", action="store_true",
                   help="train on ZCA-whitened images (fitted on the training images, eps 0.1 as the MTT reference; "
                        "stored as DIR/zca.safetensors); distill with --set zca=true")
    p.add_argument("--curriculum", choices=("none", "el2n"), default="none",
                   help="PAD's data selection (buffer_CL.py): train early epochs on the easier share of every class "
                        "by EL2N difficulty, add harder images linearly, remove the easiest late (default: none, "
                        "every epoch on all images)")
    p.add_argument("--init-ratio", type=number(float, low=0, high=1, low_open=True), default=0.75,
                   help="--curriculum: easiest share of every class at epoch 0 (default: 0.75, PAD's README)")
    p.add_argument("--add-end-epoch", type=number(int, low=1, high=100_000), default=None,
                   help="--curriculum: epoch by which every image is in (default: 20%% of --epochs; PAD: 20 of 100)")
    p.add_argument("--rm-epochs", type=_two(int), default=None, metavar="FIRST,SECOND",
                   help="--curriculum: epochs after which the easiest images are removed (default: 40%%,60%% of "
                        "--epochs; PAD: 40,60 of 100)")
    p.add_argument("--rm-easy-ratios", type=_two(float), default=(0.1, 0.2), metavar="FIRST,SECOND",
                   help="--curriculum: easiest share of every class removed in the two stages (default: 0.1,0.2)")
    p.add_argument("--el2n-epochs", type=number(int, low=1, high=1000), default=3,
                   help="--curriculum: epochs the EL2N scoring networks train before scoring (default: 3)")
    p.add_argument("--el2n-members", type=number(int, low=1, high=64), default=4,
                   help="--curriculum: networks the EL2N score is averaged over (default: 4)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the networks (auto: on CPU when a chunk takes at least 300 steps)")
    p.add_argument("--out", default=None, help="expert folder (default: runs/experts_DATASET_MODEL_seedS)")
    p.add_argument("--resume", action="store_true",
                   help="continue the expert set in --out from its last completed epochs (same settings)")
    add_data_options(p)
    add_runtime_options(p)


def _two(kind: type):
    """``A,B`` -> a pair of numbers (argparse type)."""
    def parse(text: str) -> tuple:
        parts = text.split(",")
        try:
            if len(parts) != 2:
                raise ValueError
            return tuple(kind(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected two {kind.__name__}s as FIRST,SECOND, got {text!r}") from None
    return parse


def curriculum_from_args(args: argparse.Namespace):
    """The :class:`tinyset.experts.Curriculum` the flags ask for, or None (``--curriculum none``)."""
    from tinyset.experts import Curriculum

    if getattr(args, "curriculum", "none") == "none":
        return None
    first, second = args.rm_epochs if args.rm_epochs is not None else (None, None)
    return Curriculum(init_ratio=args.init_ratio, add_end_epoch=args.add_end_epoch, rm_epoch_first=first,
                      rm_epoch_second=second, rm_easy_ratio_first=args.rm_easy_ratios[0],
                      rm_easy_ratio_second=args.rm_easy_ratios[1], el2n_epochs=args.el2n_epochs,
                      el2n_members=args.el2n_members)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tinyset.errors import ArtifactError, ConfigError
    from tinyset.experts import MANIFEST, ExpertSettings, train_experts
    from tinyset.files import check_output_dir
    from tinyset.methods import METHODS
    from tinyset.models import MODELS

    rt = getattr(args, "runtime", None)
    if rt is None:  # called without tinyset.cli.main (tests, scripts)
        from tinyset.runtime import resolve_runtime

        rt = resolve_runtime(args.device, args.precision, args.threads, configure=False)
    if args.model not in MODELS:
        raise ConfigError(f"--model {args.model!r} is not a registered architecture; known: "
                          f"{', '.join(MODELS.names())}")
    settings = ExpertSettings(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                              batch_size=args.batch_size, lr_decay=args.lr_decay, members=args.members,
                              val_per_class=args.val_per_class, dsa_strategy=args.dsa_strategy,
                              precision=rt.precision, compile={"auto": None, "on": True, "off": False}[args.compile],
                              zca=args.zca, curriculum=curriculum_from_args(args))
    if settings.curriculum is not None:
        settings.curriculum.epochs_for(settings.epochs)  # refuse an inconsistent schedule before any work
    if settings.dsa_strategy is not None:
        from tinyset.augment import parse_strategy

        parse_strategy(settings.dsa_strategy)
    if args.out is not None and not args.out.strip():
        raise ConfigError("--out '': empty path; expected the expert folder (or leave --out out for the default)")
    default = f"runs/{default_run_name('experts', args.dataset, MODELS._key(args.model), f'seed{args.seed}')}"
    out = Path(args.out if args.out is not None else default)
    check_output_dir(out, flag="--out")
    if not args.resume and (out / MANIFEST).exists():
        raise ConfigError(f"--out {out} already holds an expert set; pass --resume to continue it or choose "
                          f"another --out")
    if args.resume and not (out / MANIFEST).is_file():
        raise ArtifactError(f"--resume: no expert set at {out} ({MANIFEST} is missing); drop --resume to start one")
    train = load_split(args, args.dataset, "train")
    total = args.num_experts * args.epochs
    bar = tqdm(total=total, unit="epoch", dynamic_ncols=True, file=sys.stderr, disable=None,
               bar_format="{l_bar}{bar}| {n:.1f}/{total} expert-epochs [{elapsed}<{remaining}{postfix}]")

    def progress(done: float, total_: int, status: dict) -> None:
        if status["kind"] == "epoch":
            bar.set_postfix(chunk=status["chunk"], epoch=status["epoch"], loss=f"{status['loss']:.3f}",
                            val_acc=f"{status['val_acc']:.3f}", refresh=False)
        bar.update(done - bar.n)

    try:
        experts = train_experts(train, out, args.num_experts, args.model, settings, seed=args.seed,
                                device=rt.device, resume=args.resume, progress=progress)
    finally:
        bar.close()
    finals = [experts.val_acc(i)[-1] for i in experts.complete()]
    mean = sum(finals) / len(finals) if finals else float("nan")
    print(f"{len(finals)} experts ({experts.model}, {experts.epochs} epochs each) in {out}; validation accuracy "
          f"after the last epoch: mean {100 * mean:.1f}% ({experts.manifest['val_images']} held-out training images)")
    kind = "curriculum" if "curriculum" in experts.manifest else "plain"
    method = "|".join(n for n in METHODS.names() if getattr(METHODS.get(n), "expert_kind", None) == kind)
    print(f"distill with them: tinyset distill --method {method} --dataset {args.dataset} --ipc K --model {experts.model} "
          f"--set experts={out}" + (" --set zca=true" if experts.zca else ""))
    return 0
