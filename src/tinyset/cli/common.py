"""Options and helpers shared by the subcommands: data, runtime, outputs, result printing."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from tinyset.errors import ConfigError

THREADS_HELP = ("torch threads (default: $TINYSET_THREADS, else the CPUs this process may use, from its "
                "affinity and cgroup quota); on a shared machine give each run its share, e.g. --threads 1")


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None,
                   help="folder with the datasets in torchvision's layout (default: $TINYSET_DATA or ./data)")
    p.add_argument("--download", action="store_true",
                   help="fetch missing dataset files from the official mirrors (checksums verified)")


def add_runtime_options(p: argparse.ArgumentParser, precision: bool = True) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto: cuda when available (default)")
    p.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    if precision:
        p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                       help="autocast precision: auto = bf16 only on a CPU with native bf16 (AVX512-BF16/AMX), "
                            "fp32 on CUDA and on other CPUs")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")


def add_force(p: argparse.ArgumentParser, what: str = "output") -> None:
    p.add_argument("--force", action="store_true", help=f"replace an existing {what}")


def load_split(args: argparse.Namespace, dataset: str, split: str):
    from tinyset.data import load_dataset

    return load_dataset(dataset, split, root=args.data_root, download=args.download)


def parse_models(text: str) -> list[str]:
    """``--models a,b`` -> names, all checked against the registry before any work."""
    from tinyset.models import MODELS

    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise ConfigError(f"--models {text!r} names no architecture; e.g. --models convnet,mlp "
                          f"(see `tinyset models`)")
    bad = [m for m in names if m not in MODELS]
    if bad:
        raise ConfigError(f"--models: unknown architecture(s) {', '.join(repr(b) for b in bad)}; known: "
                          f"{', '.join(MODELS.names())}")
    return names


def check_json_out(args: argparse.Namespace) -> None:
    """A ``--json`` path is checked before work starts (an evaluation must not die at its end)."""
    from tinyset.files import check_output_file

    if getattr(args, "json_out", None):
        check_output_file(args.json_out, force=args.force, flag="--json")


def write_result_json(args: argparse.Namespace, result: Any) -> None:
    from tinyset.files import write_json

    if getattr(args, "json_out", None):
        write_json(args.json_out, result.to_dict())
        print(f"results written to {args.json_out}")


def print_evaluation(res: Any, title: str) -> None:
    from tinyset.evaluate import format_table

    p = res.protocol
    print(format_table(res.results, title=title))
    print(f"protocol {p['name']}: {p['epochs']} epochs ({p['schedule']} schedule: {p['train_epochs']} passes, "
          f"lr x{p['lr_decay_factor']} from pass {p['decay_epoch'] + 1}), lr {p['lr_used']}, batch {p['batch_size']}, "
          f"augment {p['augment_strategy']}, {p['num_models']} models per architecture, "
          f"precision {p['precision_used']}; test accuracy after the last epoch")


def evaluation_bar(models: list[str], epochs: int) -> tuple[Callable[..., None], Callable[..., None],
                                                           Callable[[], None]]:
    """A bar counted in epochs over all architectures, moved after every optimiser step, with the last
    epoch's loss and train accuracy; returns (on_epoch, on_step, close)."""
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


def positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")


def default_run_name(*parts: Any) -> str:
    return "_".join(str(p).replace(":", "_").replace("/", "_") for p in parts)


__all__ = ["add_data_options", "add_runtime_options", "add_force", "load_split", "parse_models",
           "check_json_out", "write_result_json", "print_evaluation", "evaluation_bar", "positive",
           "default_run_name", "Path"]
