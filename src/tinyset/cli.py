"""The ``tinyset`` command line: datasets, select, distill, evaluate, baseline, show, export."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from tinyset import __version__
from tinyset.errors import TinysetError

EPILOG = """examples:
  tinyset distill --method dm --dataset digits --ipc 10          # no download, about a minute
  tinyset select --method random --dataset mnist --ipc 10 --out runs/random10.safetensors
  tinyset evaluate runs/random10.safetensors --models convnet,mlp --num-models 5
  tinyset baseline --dataset mnist
  tinyset show runs/random10.safetensors --out grid.png
"""


def _common(p: argparse.ArgumentParser, data: bool = True) -> None:
    if data:
        p.add_argument("--data-root", default=None,
                       help="folder with the datasets in torchvision's layout (default: $TINYSET_DATA or ./data)")
        p.add_argument("--download", action="store_true",
                       help="fetch missing dataset files from the official mirrors (checksums verified)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, or auto (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default: 0)")


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="convnet",
                   help="comma-separated architectures to train on the set (default: convnet)")
    p.add_argument("--protocol", default=None,
                   help="evaluation preset: dsa (1000 epochs, DSA; default of evaluate), noaug (300 epochs), "
                        "quick, fulldata (6 epochs, default of baseline), fulldata-long (16 epochs, DSA, 3 nets)")
    p.add_argument("--num-models", type=int, default=None, help="networks per architecture (default: preset's)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: preset's); dsa and noaug count them as upstream does, "
                        "training epochs+1 passes with lr x0.1 after pass epochs//2+2")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: preset's, 0.01)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default: 256)")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum (default: 0.9)")
    p.add_argument("--weight-decay", type=float, default=None, help="SGD weight decay (default: 5e-4)")
    p.add_argument("--augment", choices=("dsa", "none"), default=None, help="train-time augmentation")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bfloat16 autocast where the hardware runs it natively (default)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the training step (auto: for long runs on CPU)")
    p.add_argument("--json", dest="json_out", default=None, help="write the results as JSON to this file")


def _protocol_from(args: argparse.Namespace, default: str) -> Any:
    from tinyset.evaluate import Protocol

    return Protocol.preset(args.protocol or default, num_models=args.num_models, epochs=args.epochs,
                           lr=args.lr, batch_size=args.batch_size, augment=args.augment,
                           momentum=args.momentum, weight_decay=args.weight_decay,
                           precision=args.precision,
                           compile={"auto": None, "on": True, "off": False}[args.compile])


def _progress_bar(models: list[str], epochs: int) -> tuple[Callable[..., None], Callable[..., None],
                                                           Callable[[], None]]:
    """A bar counted in epochs over all architectures, moved after every optimiser step (an epoch
    of a full dataset is hundreds of steps), with the last epoch's loss and train accuracy."""
    from tqdm import tqdm

    bar = tqdm(total=len(models) * epochs, unit="epoch", dynamic_ncols=True, file=sys.stderr,
               disable=None, bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}{postfix}]")

    def on_epoch(model: str, ep: int, total: int, loss: float, acc: float) -> None:
        bar.set_postfix(loss=f"{loss:.3f}", train_acc=f"{acc:.3f}", refresh=False)

    state = {"index": -1, "model": None, "done": 0.0}

    def on_step(model: str, epochs_done: float, total: int) -> None:
        if model != state["model"] or epochs_done < state["done"]:  # the next architecture began
            state["index"] += 1
            state["model"] = model
            bar.set_description(model, refresh=False)
        state["done"] = epochs_done
        bar.update(state["index"] * epochs + epochs_done - bar.n)

    return on_epoch, on_step, bar.close


def _print_results(res: dict[str, Any], json_out: str | None, title: str) -> None:
    from tinyset.evaluate import format_table
    from tinyset.files import write_json

    p = res["protocol"]
    print(format_table(res["results"], title=title))
    print(f"protocol {p['name']}: {p['epochs']} epochs ({p['schedule']} schedule: {p['train_epochs']} passes, "
          f"lr x{p['lr_decay_factor']} from pass {p['decay_epoch'] + 1}), lr {p['lr_used']}, batch {p['batch_size']}, "
          f"augment {p['augment_strategy']}, {p['num_models']} models per architecture, "
          f"precision {p['precision_used']}; test accuracy after the last epoch")
    if json_out:
        write_json(json_out, res)
        print(f"results written to {json_out}")


def _load_split(args: argparse.Namespace, dataset: str, split: str):
    from tinyset.data import load_dataset

    return load_dataset(dataset, split, root=args.data_root, download=args.download)


# ---------------------------------------------------------------------------------------- commands
def cmd_datasets(args: argparse.Namespace) -> int:
    from tinyset.data import DATASETS, default_data_root, get_spec

    root = Path(args.data_root) if args.data_root else default_data_root()
    print(f"data root: {root.resolve()}")
    header = f"{'name':<14} {'image':<9} {'classes':>7}  status"
    print(header)
    print("-" * len(header))
    for name in DATASETS.names():
        spec = get_spec(name)
        info = spec.info
        files = spec.files(root)
        missing = [f for f in files if not (f.exists() or Path(str(f) + ".gz").exists()
                                            or (str(f).endswith(".gz") and Path(str(f)[:-3]).exists()))]
        if not files:
            status = "built in (no download)"
        elif missing:
            status = f"missing {len(missing)} of {len(files)} files (e.g. {missing[0]}); --download fetches them"
        else:
            status = f"found in {files[0].parent}"
        size = f"{info.channels}x{info.image_size[0]}x{info.image_size[1]}"
        print(f"{name:<14} {size:<9} {info.num_classes:>7}  {status}")
    print("imagefolder:PATH  any folder of class subfolders with PNG/JPEG images")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from tinyset.models import MODELS

    for name in MODELS.names():
        print(f"{name:<16} {MODELS.help(name)}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from tinyset.select import select

    train = _load_split(args, args.dataset, "train")
    synset = select(args.method, train, args.ipc, seed=args.seed, device=args.device)
    out = Path(args.out or f"runs/{args.method}_{args.dataset}_ipc{args.ipc}_seed{args.seed}.safetensors")
    synset.save(out)
    print(f"selected {len(synset)} images ({args.ipc} per class) of {args.dataset} with {args.method}: {out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tinyset.evaluate import evaluate_synset
    from tinyset.synset import SyntheticSet
    from tinyset.runtime import resolve_device

    synset = SyntheticSet.load(args.file)
    device = resolve_device(args.device)
    protocol = _protocol_from(args, "dsa")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    test = _load_split(args, synset.info.name, "test")
    on_epoch, on_step, close = _progress_bar(models, protocol.train_epochs)
    try:
        res = evaluate_synset(synset, test, models, protocol, seed=args.seed, device=device, progress=on_epoch,
                              step_progress=on_step)
    finally:
        close()
    res["file"] = str(args.file)
    _print_results(res, args.json_out, f"{args.file}: {len(synset)} images of {synset.info.name}, "
                                       f"method {synset.meta.get('method')}")
    return 0


def cmd_baseline(args: argparse.Namespace) -> int:
    from tinyset.evaluate import evaluate_full
    from tinyset.runtime import resolve_device

    device = resolve_device(args.device)
    protocol = _protocol_from(args, "fulldata")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    train = _load_split(args, args.dataset, "train")
    test = _load_split(args, args.dataset, "test")
    on_epoch, on_step, close = _progress_bar(models, protocol.train_epochs)
    try:
        res = evaluate_full(train, test, models, protocol, seed=args.seed, device=device, progress=on_epoch,
                            step_progress=on_step)
    finally:
        close()
    _print_results(res, args.json_out, f"full training set of {args.dataset} ({len(train)} images)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from tinyset.synset import SyntheticSet
    from tinyset.viz import save_grid

    synset = SyntheticSet.load(args.file)
    out = save_grid(synset, args.out, upscale=args.upscale)
    print(f"{len(synset)} images, one row per class: {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tinyset.export import export_imagefolder, export_npz
    from tinyset.synset import SyntheticSet

    synset = SyntheticSet.load(args.file)
    if args.format == "imagefolder":
        out = export_imagefolder(synset, args.out, overwrite=args.overwrite)
    else:
        out = export_npz(synset, args.out, overwrite=args.overwrite)
    print(f"exported {len(synset)} images as {args.format}: {out}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from tinyset.methods.runner import run_distill_cli

    return run_distill_cli(args)


# ---------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyset", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Dataset distillation and coreset selection: learn or pick a few images per class, "
                    "then evaluate them by training fresh networks on them.")
    parser.add_argument("--version", action="version", version=f"tinyset {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("datasets", help="list known datasets and whether their files are found")
    p.add_argument("--data-root", default=None, help="folder to look in (default: $TINYSET_DATA or ./data)")
    p.set_defaults(fn=cmd_datasets)

    p = sub.add_parser("models", help="list the registered network architectures")
    p.set_defaults(fn=cmd_models)

    from tinyset.select import SELECTORS

    p = sub.add_parser("select", help="pick ipc real images per class with a coreset method")
    p.add_argument("--method", required=True, choices=SELECTORS.names())
    p.add_argument("--dataset", required=True, help="dataset name (see `tinyset datasets`) or imagefolder:PATH")
    p.add_argument("--ipc", type=int, required=True, help="images per class")
    p.add_argument("--out", default=None, help="output .safetensors file (default: runs/METHOD_DATASET_ipcK_seedS.safetensors)")
    _common(p)
    p.set_defaults(fn=cmd_select)

    from tinyset.methods import METHODS

    p = sub.add_parser("distill", help="learn a synthetic set with a matching method (DM, DC, DSA)")
    p.add_argument("--method", required=True, choices=METHODS.names())
    p.add_argument("--dataset", required=True, help="dataset name or imagefolder:PATH")
    p.add_argument("--ipc", type=int, required=True, help="synthetic images per class")
    p.add_argument("--iterations", type=int, default=None, help="outer iterations (default: preset's)")
    p.add_argument("--init", choices=("real", "noise"), default=None, help="initial images (default: preset's)")
    p.add_argument("--preset", default="cpu", help="hyper-parameter preset: paper or cpu (default: cpu)")
    p.add_argument("--model", default=None, help="network used for matching (default: preset's, convnet)")
    p.add_argument("--lr-img", type=float, default=None, help="learning rate of the images (default: preset's)")
    p.add_argument("--batch-real", type=int, default=None, help="real images per class per iteration")
    p.add_argument("--eval-every", type=int, default=0,
                   help="evaluate on a held-out validation split every N iterations (0: never)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="checkpoint every N iterations (default: 50)")
    p.add_argument("--out", default=None, help="output directory (default: runs/METHOD_DATASET_ipcK_seedS)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    p.add_argument("--final-eval", choices=("auto", "on", "off"), default="auto",
                   help="evaluate the final set on the test split (auto: with the 'quick' protocol "
                        "for the cpu preset, 'dsa' for paper)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="autocast precision of the matching network's forward pass")
    _common(p)
    p.set_defaults(fn=cmd_distill)

    p = sub.add_parser("evaluate", help="train fresh networks on a synthetic-set file, report test accuracy")
    p.add_argument("file", help="a .safetensors synthetic-set file")
    _eval_options(p)
    _common(p)
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("baseline", help="accuracy of the same networks trained on the whole training set")
    p.add_argument("--dataset", required=True)
    _eval_options(p)
    _common(p)
    p.set_defaults(fn=cmd_baseline)

    p = sub.add_parser("show", help="save a synthetic set as an image grid (one row per class)")
    p.add_argument("file")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--upscale", type=int, default=None, help="pixel repeat factor (default: to >= 32 px)")
    p.set_defaults(fn=cmd_show)

    p = sub.add_parser("export", help="export a synthetic set as an ImageFolder of PNGs or an .npz")
    p.add_argument("file")
    p.add_argument("--format", choices=("imagefolder", "npz"), required=True)
    p.add_argument("--out", required=True, help="output folder (imagefolder) or file (npz)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(fn=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("select", "distill", "evaluate", "baseline"):
        from tinyset.runtime import tune_allocator

        tune_allocator()
    try:
        return int(args.fn(args) or 0)
    except TinysetError as exc:
        print(f"tinyset {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tinyset {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
