"""``tinyset distill``: learn a synthetic set with a distillation method."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from tinyset.cli.common import add_data_options, add_runtime_options, default_run_name, load_split, number, positive

HELP = "learn a synthetic set with a distillation method (see `tinyset methods`)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from tinyset.methods import METHODS
    from tinyset.methods.base import INITS

    p.add_argument("--method", required=True, choices=METHODS.names())
    p.add_argument("--dataset", required=True, help="dataset name or imagefolder:PATH")
    p.add_argument("--ipc", type=number(int, low=1), required=True, help="synthetic images per class")
    p.add_argument("--preset", default="cpu", choices=("paper", "cpu"),
                   help="paper: the published settings; cpu (default): the same with the method's cpu rule "
                        "applied (fewer iterations; `tinyset methods NAME` shows it)")
    p.add_argument("--config", dest="config_file", default=None, metavar="FILE.toml",
                   help="your own settings, key = value lines (see `tinyset methods NAME` for the keys)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="one setting (repeatable), e.g. --set lr_img=0.5; wins over --config and the preset")
    p.add_argument("--iterations", type=number(int, low=1), default=None, help="outer iterations (default: preset's)")
    p.add_argument("--init", default=None, metavar="SOURCE",
                   help="initial images (default: preset's): " + "; ".join(
                       f"{INITS.get(n).form}: {INITS.help(n)}" for n in INITS.names()))
    p.add_argument("--model", default=None, help="network used for matching (default: preset's, convnet)")
    p.add_argument("--lr-img", type=number(float, low=0, low_open=True), default=None,
                   help="learning rate of the images (default: preset's)")
    p.add_argument("--batch-real", type=number(int, low=1), default=None, help="real images per class per iteration")
    p.add_argument("--eval-every", type=number(int, low=0), default=0,
                   help="evaluate on a validation split held out of the training images every N iterations "
                        "(0: never) and keep the best set by that accuracy as best.safetensors in --out")
    p.add_argument("--checkpoint-every", type=number(int, low=1), default=50,
                   help="checkpoint every N iterations (default: 50)")
    p.add_argument("--out", default=None, help="run folder (default: runs/METHOD_DATASET_ipcK_seedS)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (bit-exact on CPU; CUDA kernels are "
                        "not bit-repeatable, so a resumed CUDA run matches only to rounding)")
    p.add_argument("--final-eval", choices=("auto", "on", "off"), default="auto",
                   help="evaluate the final set on the test split (auto: the config's final_eval protocol, "
                        "quick for the cpu preset and dsa for paper; on: dsa)")
    add_data_options(p)
    add_runtime_options(p)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from tinyset.cli.common import print_evaluation
    from tinyset.data import check_ipc
    from tinyset.files import check_output_dir
    from tinyset.hparams import parse_sets
    from tinyset.methods import METHODS
    from tinyset.methods.loop import distill, method_precision, resolve_config

    rt = args.runtime
    positive("--ipc", args.ipc)
    positive("--checkpoint-every", args.checkpoint_every)
    if args.eval_every < 0:
        raise_config(f"--eval-every must be >= 0, got {args.eval_every}")
    flags = {"iterations": args.iterations, "init": args.init, "model": args.model, "lr_img": args.lr_img,
             "batch_real": args.batch_real}
    sets = parse_sets(args.sets)
    check_config_file(args.config_file)
    # every setting is checked before any data is read or any file written
    config = resolve_config(args.method, args.dataset, args.ipc, args.preset, args.config_file, sets, flags)
    if args.out is not None and not args.out.strip():
        raise_config("--out '': empty path; expected the run folder (or leave --out out for the default)")
    default = f"runs/{default_run_name(args.method, args.dataset, f'ipc{args.ipc}', f'seed{args.seed}')}"
    out = Path(args.out if args.out is not None else default)
    check_output_dir(out, flag="--out")
    if not args.resume and out.is_dir() and (out / "checkpoint.safetensors").exists():
        raise_config(f"--out {out} already holds a run; pass --resume to continue it or choose another --out")
    if args.resume and not (out / "checkpoint.safetensors").is_file():
        raise_config(f"--resume: no checkpoint at {out / 'checkpoint.safetensors'}; expected --out to be the "
                     f"folder of an interrupted run (drop --resume to start a new one)")
    train = load_split(args, args.dataset, "train")
    check_ipc(train, args.ipc)
    test = None if args.final_eval == "off" else load_split(args, args.dataset, "test")
    bar = tqdm(total=config.values.iterations, unit="it", dynamic_ncols=True, file=sys.stderr, disable=None)

    def update(it: int, total: int, loss: float, ev: dict | None) -> None:
        if bar.n == 0 and it > 1:
            bar.update(it - 1)
        bar.total = total
        post = {"loss": f"{loss:.4f}"}
        if ev:
            post["val_acc"] = f"{100 * ev['mean']:.1f}"
        bar.set_postfix(post)
        bar.update(1)

    precision, why = method_precision(METHODS.get(args.method), getattr(args, "precision", "auto"), rt.device,
                                      rt.precision)
    if why is not None:
        rt = dataclasses.replace(rt, precision=precision, precision_reason=why)
        print(f"precision {precision} ({why})", file=sys.stderr)
    try:
        res = distill(args.method, train, args.ipc, out, preset=args.preset, config_file=args.config_file,
                      sets=sets, overrides=flags, seed=args.seed, device=rt.device, precision=rt.precision,
                      resume=args.resume, checkpoint_every=args.checkpoint_every, eval_every=args.eval_every,
                      test=test, final_eval="dsa" if args.final_eval == "on" else None, on_iteration=update,
                      runtime_info=rt.to_dict())
    finally:
        bar.close()
    print(f"distilled {len(res.synset)} images ({args.ipc} per class) with {res.method} in {res.iterations} "
          f"iterations, {res.wall_time_s:.1f} s: {out / 'synset.safetensors'}")
    if res.best is not None:
        b = res.best
        print(f"best set by validation accuracy: iteration {b['iteration']}, {100 * b['mean']:.2f} +- "
              f"{100 * b['std']:.2f} ({b['protocol']} protocol on images held out of the training split): {b['file']}")
    if res.evaluation is not None:
        print_evaluation(res.evaluation, f"test accuracy of networks trained on {out / 'synset.safetensors'}")
        print(f"results written to {out / 'eval.json'}; the full protocol: tinyset evaluate "
              f"{out / 'synset.safetensors'}")
    return 0


def check_config_file(path: str | None) -> None:
    """A ``--config`` that is a folder or cannot be read is refused here with a one-line message (the
    reader itself reports a missing file and bad TOML)."""
    if path is None:
        return
    p = Path(path)
    if not str(path).strip():
        raise_config("--config '': empty path; expected a TOML file of settings (key = value)")
    if p.is_dir():
        raise_config(f"--config {path}: is a folder; expected a TOML file of settings (key = value)")
    if p.exists():
        try:
            with open(p, "rb"):
                pass
        except OSError as exc:
            raise_config(f"--config {path}: cannot be read ({exc.strerror or exc}); expected a readable TOML "
                         f"file of settings (key = value)")


def raise_config(message: str) -> None:
    from tinyset.errors import ConfigError

    raise ConfigError(message)
