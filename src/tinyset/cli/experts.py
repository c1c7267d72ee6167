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
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the networks (auto: on CPU when a chunk takes at least 300 steps)")
    p.add_argument("--out", default=None, help="expert folder (default: runs/experts_DATASET_MODEL_seedS)")
    p.add_argument("--resume", action="store_true",
                   help="continue the expert set in --out from its last completed epochs (same settings)")
    add_data_options(p)
    add_runtime_options(p)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tinyset.errors import ArtifactError, ConfigError
    from tinyset.experts import MANIFEST, ExpertSettings, train_experts
    from tinyset.files import check_output_dir
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
                              zca=args.zca)
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
    print(f"distill with them: tinyset distill --method mtt --dataset {args.dataset} --ipc K --model {experts.model} "
          f"--set experts={out}" + (" --set zca=true" if experts.zca else ""))
    return 0
