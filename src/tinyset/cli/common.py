"""Options and helpers shared by the subcommands: data, runtime, outputs, result printing."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable

from tinyset.errors import ConfigError
from tinyset.hparams import describe_range

#: the largest finite float32: training runs in float32, so a larger setting overflows inside torch
FLOAT32_MAX = 3.4028234663852886e38
#: the largest integer a numeric flag accepts (torch holds counts and sizes as int64)
INT64_MAX = 2**63 - 1
#: the most --threads accepted (torch's own limit is far larger, but overflows past 2**63)
from tinyset.runtime import MAX_THREADS  # noqa: E402

THREADS_HELP = ("torch threads (default: $TINYSET_THREADS, else the CPUs this process may use, from its "
                "affinity and cgroup quota); on a shared machine give each run its share, e.g. --threads 1")


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None,
                   help="folder with the datasets in torchvision's layout (default: $TINYSET_DATA or ./data)")
    p.add_argument("--download", action="store_true",
                   help="fetch missing dataset files from the official mirrors (checksums verified)")


def add_runtime_options(p: argparse.ArgumentParser, precision: bool = True, seed: bool = True) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto: cuda when available (default)")
    p.add_argument("--threads", type=number(int, low=1, high=MAX_THREADS), default=None, help=THREADS_HELP)
    if precision:
        p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                       help="autocast precision: auto = bf16 only on a CPU with native bf16 (AVX512-BF16/AMX), "
                            "fp32 on CUDA and on other CPUs; a distillation method may pin auto to fp32 "
                            "(`tinyset methods NAME` says so)")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")


def number(kind: type = float, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> Callable[[str], int | float]:
    """An argparse ``type`` for a numeric flag: parses ``kind`` (int or float) and refuses NaN,
    infinity, floats beyond the float32 range, integers beyond int64 and values outside ``[low, high]`` (``low_open`` /
    ``high_open`` exclude a bound), so a bad number is a usage error naming the flag and the value
    before any work starts."""
    what = describe_range(kind is int, low, high, low_open, high_open)

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {what}") from None
        if kind is int and abs(value) > INT64_MAX:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {what} that fits in 64 bits "
                                             f"(at most {INT64_MAX})")
        if kind is not int:
            if math.isnan(value) or (math.isinf(value) and "inf" in text.lower()):
                raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {what}; NaN and infinity "
                                                 f"are never allowed")
            if not abs(value) <= FLOAT32_MAX:  # also a number too large even for float64 (parsed as inf)
                raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {what} within the float32 "
                                                 f"range (at most {FLOAT32_MAX:.3g}) that training uses")
        if ((low is not None and (value < low or (low_open and value == low)))
                or (high is not None and (value > high or (high_open and value == high)))):
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {what}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


def data_root(args: argparse.Namespace) -> Path | None:
    """``--data-root`` checked: None (the default root), else an existing-or-missing folder path;
    an empty path or a path to a file is refused."""
    from tinyset.errors import ConfigError

    root = getattr(args, "data_root", None)
    if root is None:
        return None
    if not str(root).strip():
        raise ConfigError("--data-root '': empty path; expected the folder that holds the datasets "
                          "(or leave the flag out to use $TINYSET_DATA or ./data)")
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--data-root {root}: is a file, not a folder; expected the folder that holds "
                          f"the datasets")
    return path


def load_synset(path: str) -> Any:
    """:meth:`SyntheticSet.load` of a positional FILE argument, refusing an empty path and a file
    this process may not read with a message that says so (rather than "not a valid file")."""
    from tinyset.errors import ArtifactError
    from tinyset.synset import SyntheticSet

    if not str(path).strip():
        raise ArtifactError("'': empty path; expected a .safetensors synthetic-set file")
    p = Path(path)
    if p.is_file():
        try:
            with open(p, "rb"):
                pass
        except OSError as exc:
            raise ArtifactError(f"{path}: cannot be read ({exc.strerror or exc}); expected a readable "
                                f".safetensors synthetic-set file") from None
    return SyntheticSet.load(p)


def check_distinct(flag: str, path: str | None, other_flag: str, other: str | Path | None) -> None:
    """Refuse an output path that names the same file as another path of the command (an input, or
    another output): writing it would destroy that file, even with --force."""
    from tinyset.errors import OutputError

    if path is None or other is None or not str(path).strip() or not str(other).strip():
        return
    a, b = Path(path).expanduser().resolve(), Path(other).expanduser().resolve()
    if a == b:
        raise OutputError(f"{flag} {path}: is the same file as {other_flag} {other}; choose another path")


def add_force(p: argparse.ArgumentParser, what: str = "output") -> None:
    p.add_argument("--force", action="store_true", help=f"replace an existing {what}")


def load_split(args: argparse.Namespace, dataset: str, split: str):
    from tinyset.data import load_dataset

    return load_dataset(dataset, split, root=data_root(args), download=args.download)


def parse_models(text: str) -> list[str]:
    """``--models a,b`` -> names, checked before any work by the evaluator's own check."""
    from tinyset.evaluate import check_models

    return check_models(text)


def check_json_out(args: argparse.Namespace) -> None:
    """A ``--json`` path is checked before work starts (an evaluation must not die at its end)."""
    from tinyset.files import check_output_file

    if getattr(args, "json_out", None) is not None:
        check_output_file(args.json_out, force=args.force, flag="--json")


def write_result_json(args: argparse.Namespace, result: Any) -> None:
    from tinyset.files import write_json

    if getattr(args, "json_out", None) is not None:
        write_json(args.json_out, result.to_dict())
        print(f"results written to {args.json_out}")


def print_evaluation(res: Any, title: str) -> None:
    from tinyset.evaluate import format_table

    p = res.protocol
    split = res.scored_on.get("split", "test")
    print(format_table(res.results, title=title, split=split))
    if split != "test":
        print(scored_on_line(res.scored_on))
    print(f"protocol {p['name']}: {p['epochs']} epochs ({schedule_text(p)}), lr {p['lr_used']}, batch {p['batch_size']}, "
          f"augment {p['augment_strategy']}, {p['num_models']} models per architecture, "
          f"precision {p['precision_used']}; {timing_lines(res)}")


def scored_on_line(scored: dict) -> str:
    """One line on a validation split a result was scored on."""
    seen = ("never one of the set's own source images" if scored.get("set_source_images_excluded")
            else "the set records no source images: a distilled set's method may have seen these images")
    return (f"scored on {scored.get('images')} images ({scored.get('per_class')} per class) held out of the "
            f"training split, seed {scored.get('seed')}, not the test split; {seen}")


def schedule_text(p: dict) -> str:
    """How a recorded protocol trained: its passes and lr schedule, and its optimiser and loss when
    they are not SGD with cross-entropy (results written before those fields existed are SGD/ce)."""
    if p.get("lr_schedule", "step") == "warmup_cosine":
        text = (f"{p['train_epochs']} passes, lr warm-up over {p['warmup_steps']} steps then a cosine to "
                f"x{p['final_lr_factor']:g}")
    elif p["lr_decay_factor"] == 1.0:
        text = f"{p['schedule']} schedule: {p['train_epochs']} passes, constant lr"
    else:
        text = (f"{p['schedule']} schedule: {p['train_epochs']} passes, lr x{p['lr_decay_factor']} from pass "
                f"{p['decay_epoch'] + 1}")
    extra = [f"{key} {p[key]}" for key, usual in (("optimizer", "sgd"), ("loss", "ce")) if p.get(key, usual) != usual]
    return ", ".join([text, *extra])


def timing_lines(res: Any) -> str:
    """What the accuracies are of (the last epoch, or early stopping's best validation epochs) and the
    wall times of every architecture's ensemble (training, validation inside it, the pass over the
    scored split: test, or ``--split validation``'s images)."""
    p = res.protocol
    split = (getattr(res, "scored_on", None) or {}).get("split", "test")
    if p.get("early_stop_patience") is None:
        out = [f"{split} accuracy after the last epoch"]
    else:
        out = [f"early stopping: patience {p['early_stop_patience']} epochs, validation every {p['val_every']} "
               f"epochs on {p.get('validation', {}).get('images', '?')} images held out of the training split; "
               f"test accuracy of every network's best validation epoch"]
        out += [f"  {r.model}: stop epochs {r.stop_epochs} (the last one run for a network that never stopped), "
                f"best validation epochs {r.best_epochs}"
                for r in res.results if r.stop_epochs is not None]
    out += [f"wall time of {r.model} ({len(r.accuracies)} networks at once): training {r.train_seconds:.1f} s"
            + (f" (validation {r.val_seconds:.1f} s)" if r.val_seconds else "")
            + f" over {r.epochs_trained} epochs, {split} pass {r.test_seconds:.1f} s"
            for r in res.results if getattr(r, "epochs_trained", None) is not None]
    return "\n".join(out)


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


__all__ = ["add_data_options", "add_runtime_options", "add_force", "number", "data_root", "load_split",
           "load_synset", "check_distinct", "parse_models", "check_json_out", "write_result_json",
           "print_evaluation", "evaluation_bar", "positive", "default_run_name", "Path"]
