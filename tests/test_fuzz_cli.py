"""A fuzz table of bad command lines: every subcommand x bad paths, numbers, names, corrupt files,
existing outputs and unwritable places.

Every case must end with a non-zero status (2 for bad input, 128 + signal for a signal), one error
line (after argparse's usage block) that names the bad value or file, no traceback, and no file of
the workspace created, changed or removed. Cases run in-process through :func:`tinyset.cli.main`
(fast); a few run ``python -m tinyset.cli`` in a subprocess where the real exit code or a signal
matters. The workspace is built once per module (per xdist worker) and every case is snapshotted
against it, so cases share no mutable state.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tinyset.cli import main

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
HAS_PROC = Path("/proc/self/status").is_file()

#: cheap evaluation settings, prepended to every evaluate/baseline case (a bad flag given later wins)
EV = "--protocol quick --epochs 1 --num-models 1 --models convnet-d1 --precision fp32 --threads 1"
#: cheap distillation settings
DI = "--iterations 1 --batch-real 4 --model convnet-d1 --final-eval off --precision fp32 --threads 1"
#: the start of a cheap selection
SEL = "select --method random --dataset digits --ipc 2 --threads 1"

#: text that must never appear in a message (Python reprs of keyword arguments)
PYTHON_REPRS = ("overwrite=", "=True", "=False", "None)", "<class ", "object at 0x")


@dataclass(frozen=True)
class Case:
    argv: str
    names: tuple[str, ...]  # substrings the error line must contain (the bad value / file, and a hint)
    status: int = 2
    root_ok: bool = True  # False: needs permission bits, which root ignores
    needs_proc: bool = False


def case(id: str, argv: str, *names: str, **kw) -> object:
    c = Case(argv, names, **kw)
    marks = []
    if not c.root_ok:
        marks.append(pytest.mark.skipif(IS_ROOT, reason="root ignores permission bits"))
    if c.needs_proc:
        marks.append(pytest.mark.skipif(not HAS_PROC, reason="needs Linux /proc"))
    return pytest.param(c, id=id, marks=marks)


# ------------------------------------------------------------------------------------ the table

def _file_targets(suffix: str) -> list[tuple[str, str, tuple[str, ...], dict]]:
    """Bad places for an output file: (id, path and flags, names, Case keywords)."""
    return [
        ("existing", f"existing{suffix}", (f"existing{suffix}", "already exists", "--force"), {}),
        ("folder", "folder", ("folder", "is a folder"), {}),
        ("missing-parent", f"missing/out{suffix}", (f"missing/out{suffix}", "does not exist"), {}),
        ("under-a-file", f"afile.txt/out{suffix}", ("afile.txt", "not a folder"), {}),
        ("empty", "''", ("''", "empty path"), {}),
        ("trailing-slash", f"new{suffix}/", (f"new{suffix}/", "separator"), {}),
        ("devnull-force", "/dev/null --force", ("/dev/null", "not a regular file"), {}),
        ("fifo-force", "fifo --force", ("fifo", "not a regular file"), {}),
        ("proc", f"/proc/tinyset-fuzz{suffix}", (f"/proc/tinyset-fuzz{suffix}", "cannot write"),
         {"needs_proc": True}),
        ("read-only-folder", f"ro/out{suffix}", (f"ro/out{suffix}", "not writable"), {"root_ok": False}),
        ("read-only-file-force", f"ro_file{suffix} --force", (f"ro_file{suffix}", "read-only"),
         {"root_ok": False}),
    ]


def _output_cases() -> list:
    cmds = [
        ("select-out", ".safetensors", f"{SEL} --out {{}}", "--out"),
        ("select-json", ".json", f"{SEL} --out new.safetensors --json {{}}", "--json"),
        ("evaluate-json", ".json", f"evaluate good.safetensors {EV} --json {{}}", "--json"),
        ("baseline-json", ".json", f"baseline --dataset digits {EV} --json {{}}", "--json"),
        ("show-out", ".png", "show good.safetensors --out {}", "--out"),
        ("export-npz-out", ".npz", "export good.safetensors --format npz --out {}", "--out"),
    ]
    out = []
    for cid, suffix, template, flag in cmds:
        for tid, target, names, kw in _file_targets(suffix):
            out.append(case(f"{cid}-{tid}", template.format(target), flag, *names, **kw))
    folder_targets = [
        ("a-file", "afile.txt", ("afile.txt", "is a file")),
        ("under-a-file", "afile.txt/sub", ("afile.txt", "is a file")),
        ("empty", "''", ("''", "empty path")),
    ]
    for tid, target, names in folder_targets:
        out.append(case(f"distill-out-{tid}", f"distill --method dm --dataset digits --ipc 1 {DI} --out {target}",
                        "--out", *names))
        out.append(case(f"export-folder-out-{tid}", f"export good.safetensors --format imagefolder --out {target}",
                        "--out", *names))
    out += [
        case("distill-out-proc", f"distill --method dm --dataset digits --ipc 1 {DI} --out /proc/tinyset-run",
             "--out", "/proc/tinyset-run", "cannot write", needs_proc=True),
        case("distill-out-read-only", f"distill --method dm --dataset digits --ipc 1 {DI} --out ro/run",
             "--out", "ro/run", "not writable", root_ok=False),
        case("distill-out-holds-a-run", f"distill --method dm --dataset digits --ipc 1 {DI} --out run_done",
             "run_done", "already holds a run", "--resume"),
        case("distill-resume-no-checkpoint",
             f"distill --method dm --dataset digits --ipc 1 {DI} --out run_new --resume",
             "--resume", "run_new/checkpoint.safetensors", "no checkpoint"),
        case("distill-resume-empty-folder",
             f"distill --method dm --dataset digits --ipc 1 {DI} --out folder --resume",
             "--resume", "folder/checkpoint.safetensors"),
        case("distill-resume-corrupt-checkpoint",
             f"distill --method dm --dataset digits --ipc 1 {DI} --out run_badck --resume",
             "run_badck/checkpoint.safetensors", "not a readable tinyset checkpoint"),
        case("distill-resume-truncated-checkpoint",
             f"distill --method dm --dataset digits --ipc 1 {DI} --out run_truncck --resume",
             "run_truncck/checkpoint.safetensors", "not a readable tinyset checkpoint"),
        case("distill-out-locked", f"distill --method dm --dataset digits --ipc 1 {DI} --out run_locked",
             "run_locked", "in use by another tinyset run"),
        case("export-folder-out-proc", "export good.safetensors --format imagefolder --out /proc/tinyset-x",
             "--out", "/proc/tinyset-x", "cannot write", needs_proc=True),
        case("export-folder-out-read-only", "export good.safetensors --format imagefolder --out ro/sub",
             "--out", "ro/sub", "not writable", root_ok=False),
        case("export-folder-out-not-empty", "export good.safetensors --format imagefolder --out userfolder",
             "--out", "userfolder", "not empty"),
        case("export-folder-out-not-an-export-force",
             "export good.safetensors --format imagefolder --out userfolder --force",
             "--out", "userfolder", "does not hold an earlier tinyset export"),
        case("export-folder-out-cwd-force", "export good.safetensors --format imagefolder --out . --force",
             "--out", "does not hold an earlier tinyset export"),
        case("select-json-same-as-out", f"{SEL} --out new.safetensors --json new.safetensors",
             "--json new.safetensors", "same file as --out"),
        case("select-json-same-as-out-force", f"{SEL} --out good.safetensors --json ./good.safetensors --force",
             "--json ./good.safetensors", "same file as --out"),
        case("evaluate-json-is-the-input-force", f"evaluate good.safetensors {EV} --json good.safetensors --force",
             "--json good.safetensors", "same file as the input"),
        case("export-npz-out-is-the-input-force", "export good.safetensors --format npz --out good.safetensors --force",
             "--out good.safetensors", "same file as the input"),
        case("show-out-is-the-input-force", "show existing.png --out existing.png --force",
             "--out existing.png", "same file as the input"),
        case("show-out-unknown-suffix", "show good.safetensors --out grid.xyz", "--out grid.xyz", "'.xyz'"),
        case("show-out-no-suffix", "show good.safetensors --out grid", "--out grid", "(none)"),
        case("show-out-unknown-suffix-existing-force", "show good.safetensors --out afile.txt --force",
             "--out afile.txt", "'.txt'"),
    ]
    return out


def _number_cases() -> list:
    out = []
    ev = [
        ("--lr", ["inf", "=-inf", "nan", "-1", "0", "abc", "1e39", "''"]),
        ("--momentum", ["nan", "inf", "-0.5", "1", "2", "x"]),
        ("--weight-decay", ["nan", "inf", "-1", "1e39", "x"]),
        ("--epochs", ["0", "-1", "1.5", "abc", "''", "1e3"]),
        ("--num-models", ["0", "-2", "x"]),
        ("--batch-size", ["0", "-1", "1e3", "x"]),
        ("--threads", ["0", "-1", "99999999999999999999", "x"]),
        ("--seed", ["x", "1.5", "''"]),
    ]
    for flag, values in ev:
        for v in values:
            shown = "''" if v == "''" else f"'{v.lstrip('=')}'"  # "=-inf": argparse takes "-inf" for an option
            sep = "" if v.startswith("=") else " "
            out.append(case(f"evaluate{flag}={v.lstrip('=')}", f"evaluate good.safetensors {EV} {flag}{sep}{v}",
                            flag, shown))
    for flag, v in [("--lr", "inf"), ("--lr", "nan"), ("--lr", "-1"), ("--epochs", "0"), ("--momentum", "nan"),
                    ("--weight-decay", "-1"), ("--num-models", "0"), ("--batch-size", "0"), ("--threads", "0")]:
        out.append(case(f"baseline{flag}={v}", f"baseline --dataset digits {EV} {flag} {v}", flag, f"'{v}'"))
    di = [
        ("--ipc", "0", ("--ipc", "0")), ("--ipc", "-1", ("--ipc", "-1")), ("--ipc", "1.5", ("--ipc", "'1.5'")),
        ("--ipc", "x", ("--ipc", "'x'")), ("--ipc", "100000", ("ipc=100000", "only")),
        ("--iterations", "0", ("--iterations", "0")), ("--iterations", "-5", ("--iterations", "-5")),
        ("--iterations", "x", ("--iterations", "'x'")),
        ("--lr-img", "inf", ("--lr-img", "'inf'")), ("--lr-img", "nan", ("--lr-img", "'nan'")),
        ("--lr-img", "-1", ("--lr-img", "-1")), ("--lr-img", "0", ("--lr-img", "0")),
        ("--lr-img", "1e300", ("--lr-img", "'1e300'")),
        ("--batch-real", "0", ("--batch-real", "0")), ("--batch-real", "-2", ("--batch-real", "-2")),
        ("--batch-real", "x", ("--batch-real", "'x'")),
        ("--eval-every", "-1", ("--eval-every", "-1")), ("--eval-every", "x", ("--eval-every", "'x'")),
        ("--checkpoint-every", "0", ("--checkpoint-every", "0")),
        ("--checkpoint-every", "-1", ("--checkpoint-every", "-1")),
        ("--threads", "0", ("--threads", "'0'")), ("--seed", "x", ("--seed", "'x'")),
    ]
    for flag, v, names in di:
        ipc = "" if flag == "--ipc" else "--ipc 1 "
        out.append(case(f"distill{flag}={v}",
                        f"distill --method dm --dataset digits {ipc}{DI} --out run_new {flag} {v}", *names))
    sets = [
        ("lr_img=inf", ("lr_img", "inf")), ("lr_img=nan", ("lr_img", "nan")), ("lr_img=abc", ("lr_img", "'abc'")),
        ("batch_real=0", ("batch_real", "0")), ("init=nope", ("init", "'nope'")),
        ("nokey=1", ("--set", "nokey")), ("noequals", ("--set", "'noequals'")), ("=1", ("--set", "'=1'")),
        ("dsa_strategy=nope", ("'nope'", "DSA")),
    ]
    for s, names in sets:
        out.append(case(f"distill--set-{s}",
                        f"distill --method dm --dataset digits --ipc 1 --iterations 1 --model convnet-d1 "
                        f"--final-eval off --precision fp32 --threads 1 --out run_new --set {shlex.quote(s)}",
                        *names))
    sel = [("--ipc", "0", ("--ipc", "0")), ("--ipc", "-1", ("--ipc", "-1")), ("--ipc", "x", ("--ipc", "'x'")),
           ("--ipc", "100000", ("100000",)), ("--threads", "0", ("--threads", "'0'")),
           ("--seed", "x", ("--seed", "'x'"))]
    for flag, v, names in sel:
        out.append(case(f"select{flag}={v}", f"{SEL} --out new.safetensors {flag} {v}", *names))
    huge, giant = "9" * 400, "9" * 5000  # beyond float64 / beyond Python's int-from-text limit
    for cid, argv, names in [
        ("evaluate--epochs=400-digits", f"evaluate good.safetensors {EV} --epochs {huge}", ("--epochs", "64 bits")),
        ("evaluate--num-models=5000-digits", f"evaluate good.safetensors {EV} --num-models {giant}",
         ("--num-models",)),
        ("evaluate--lr=400-digits", f"evaluate good.safetensors {EV} --lr {huge}", ("--lr", "float32")),
        ("evaluate--threads=400-digits", f"evaluate good.safetensors {EV} --threads {huge}", ("--threads",)),
        ("distill--iterations=400-digits", f"distill --method dm --dataset digits --ipc 1 {DI} --out run_new "
                                           f"--iterations {huge}", ("--iterations", "64 bits")),
        ("distill--batch-real=400-digits", f"distill --method dm --dataset digits --ipc 1 {DI} --out run_new "
                                           f"--batch-real {huge}", ("--batch-real", "64 bits")),
        ("distill--ipc=400-digits", f"distill --method dm --dataset digits --ipc {huge} {DI} --out run_new",
         ("--ipc",)),
        ("select--ipc=400-digits", f"{SEL} --out new.safetensors --ipc {huge}", ("--ipc",)),
        ("show--upscale=400-digits", f"show good.safetensors --out new.png --upscale {huge}", ("--upscale",)),
    ]:
        out.append(case(cid, argv, *names))
    for v, names in [("1000", ("--upscale 1000", "at most")), ("99999999999999999999", ("99999999999999999999",)),
                     ("0", ("--upscale", "0")), ("-1", ("--upscale", "-1")), ("x", ("--upscale", "'x'")),
                     ("1.5", ("--upscale", "'1.5'"))]:
        out.append(case(f"show--upscale={v}", f"show good.safetensors --out new.png --upscale {v}", *names))
    return out


def _name_cases() -> list:
    out = []
    for cmd, template in [("evaluate", f"evaluate good.safetensors {EV} --models {{}}"),
                          ("baseline", f"baseline --dataset digits {EV} --models {{}}")]:
        for tid, models, names in [("empty", "''", ("--models", "''")), ("comma", ",", ("--models", "','")),
                                   ("one-unknown", "convnet,nope", ("--models", "'nope'")),
                                   ("unknown", "nope", ("--models", "'nope'")),
                                   ("two-unknown", "nope1,mlp,nope2", ("'nope1'", "'nope2'"))]:
            out.append(case(f"{cmd}--models-{tid}", template.format(models), *names))
    for cmd, template in [("evaluate", f"evaluate good.safetensors {EV} {{}}"),
                          ("baseline", f"baseline --dataset digits {EV} {{}}")]:
        out += [
            case(f"{cmd}--protocol-nope", template.format("--protocol nope"), "'nope'", "preset"),
            case(f"{cmd}--device-nope", template.format("--device nope"), "--device", "'nope'"),
            case(f"{cmd}--precision-nope", template.format("--precision nope"), "--precision", "'nope'"),
            case(f"{cmd}--augment-nope", template.format("--augment nope"), "--augment", "'nope'"),
            case(f"{cmd}--compile-nope", template.format("--compile nope"), "--compile", "'nope'"),
            case(f"{cmd}-unknown-flag", template.format("--frobnicate"), "--frobnicate"),
            case(f"{cmd}--data-root-empty", template.format("--data-root ''"), "--data-root", "''"),
            case(f"{cmd}--data-root-a-file", template.format("--data-root afile.txt"), "--data-root afile.txt",
                 "is a file"),
        ]
    if not torch.cuda.is_available():
        out.append(case("evaluate--device-cuda", f"evaluate good.safetensors {EV} --device cuda", "'cuda'", "CUDA"))
    datasets = [
        ("unknown", "nope", ("'nope'", "unknown dataset")),
        ("empty", "''", ("''", "unknown dataset")),
        ("imagefolder-empty", "imagefolder:", ("'imagefolder:'", "imagefolder:PATH")),
        ("imagefolder-blank", "'imagefolder:  '", ("'imagefolder:  '", "imagefolder:PATH")),
        ("unknown-family", "nofam:x", ("'nofam'", "family")),
        ("imagefolder-missing", "imagefolder:gone", ("gone", "not found")),
        ("imagefolder-a-file", "imagefolder:afile.txt", ("afile.txt", "is a file")),
        ("imagefolder-no-classes", "imagefolder:folder", ("folder", "no class subfolders")),
        ("mnist-missing", "mnist --data-root emptyroot", ("train-images-idx3-ubyte", "--download")),
    ]
    for tid, ds, names in datasets:
        out.append(case(f"select--dataset-{tid}", f"select --method random --dataset {ds} --ipc 1 --threads 1 "
                                                  f"--out new.safetensors", *names))
        out.append(case(f"distill--dataset-{tid}", f"distill --method dm --dataset {ds} --ipc 1 {DI} --out run_new",
                        *names))
        out.append(case(f"baseline--dataset-{tid}", f"baseline --dataset {ds} {EV}", *names))
    dis = f"distill --method dm --dataset digits --ipc 1 {DI} --out run_new"
    out += [
        case("distill--method-nope", f"distill --method nope --dataset digits --ipc 1 {DI}", "--method", "'nope'"),
        case("distill--model-nope", f"{dis} --model nope", "'nope'", "architecture"),
        case("distill--model-empty", f"{dis} --model ''", "''", "architecture"),
        case("distill--init-nope", f"{dis} --init nope", "--init", "'nope'"),
        case("distill--preset-nope", f"{dis} --preset nope", "--preset", "'nope'"),
        case("distill--final-eval-nope", f"{dis} --final-eval nope", "--final-eval", "'nope'"),
        case("distill--config-missing", f"{dis} --config nope.toml", "--config nope.toml"),
        case("distill--config-binary", f"{dis} --config good.safetensors", "--config good.safetensors", "TOML"),
        case("distill--config-json", f"{dis} --config existing.json", "--config existing.json", "TOML"),
        case("distill--config-table", f"{dis} --config table.toml", "--config table.toml", "tables"),
        case("distill--config-bad-value", f"{dis} --config badvalue.toml", "lr_img", "'fast'"),
        case("distill--config-unknown-key", f"{dis} --config unknownkey.toml", "nokey"),
        case("distill--config-folder", f"{dis} --config folder", "--config folder", "is a folder"),
        case("distill--config-empty", f"{dis} --config ''", "--config ''", "empty path"),
        case("distill--config-unreadable", f"{dis} --config unreadable.toml", "--config unreadable.toml",
             "cannot be read", root_ok=False),
        case("distill-default-out-bad-setting", f"distill --method dm --dataset digits --ipc 1 {DI} "
                                                f"--set lr_img=nan", "lr_img", "nan"),
        case("select-default-out-existing-json", f"{SEL} --json existing.json", "--json existing.json",
             "already exists"),
        case("distill--device-nope", f"{dis} --device nope", "--device", "'nope'"),
        case("distill-missing-ipc", f"distill --method dm --dataset digits {DI}", "--ipc"),
        case("select--method-nope", "select --method nope --dataset digits --ipc 1", "--method", "'nope'"),
        case("select-missing-dataset", "select --method random --ipc 1", "--dataset"),
        case("select--device-nope", f"{SEL} --out new.safetensors --device nope", "--device", "'nope'"),
        case("export--format-nope", "export good.safetensors --format nope --out x", "--format", "'nope'"),
        case("export-missing-format", "export good.safetensors --out x.npz", "--format"),
        case("show-missing-out", "show good.safetensors", "--out"),
        case("evaluate-missing-file", f"evaluate {EV}", "file"),
        case("methods-nope", "methods nope", "'nope'", "unknown method"),
        case("methods-empty", "methods ''", "''", "unknown method"),
        case("models-extra-argument", "models extra", "extra"),
        case("datasets--data-root-empty", "datasets --data-root ''", "--data-root", "''"),
        case("datasets--data-root-a-file", "datasets --data-root afile.txt", "--data-root afile.txt"),
        case("unknown-command", "frobnicate", "'frobnicate'"),
        case("no-command", "", "COMMAND"),
        case("unknown-global-flag", "--frobnicate", "--frobnicate"),
    ]
    return out


#: bad synthetic-set files: (id, file, names)
BAD_SETS = [
    ("missing", "nope.safetensors", ("nope.safetensors", "no such file")),
    ("folder", "folder", ("folder", "not a regular file")),
    ("empty", "empty.safetensors", ("empty.safetensors", "not a valid safetensors file")),
    ("truncated", "truncated.safetensors", ("truncated.safetensors", "not a valid safetensors file")),
    ("truncated-5-bytes", "trunc5.safetensors", ("trunc5.safetensors", "not a valid safetensors file")),
    ("corrupt-header", "corrupt.safetensors", ("corrupt.safetensors", "not a valid safetensors file")),
    ("garbage", "garbage.safetensors", ("garbage.safetensors", "not a valid safetensors file")),
    ("json", "existing.json", ("existing.json", "not a valid safetensors file")),
    ("no-tinyset-header", "nometa.safetensors", ("nometa.safetensors", "not a tinyset synthetic set")),
    ("header-not-json", "badjson.safetensors", ("badjson.safetensors", "not valid JSON")),
    ("wrong-format", "wrongformat.safetensors", ("wrongformat.safetensors", "wrong format")),
    ("newer-version", "v99.safetensors", ("v99.safetensors", "format_version 99")),
    ("labels-out-of-range", "badlabels.safetensors", ("badlabels.safetensors", "out of range")),
    ("nan-images", "nan.safetensors", ("nan.safetensors", "NaN")),
    ("no-labels-tensor", "nolabels.safetensors", ("nolabels.safetensors", "'labels'")),
    ("wrong-image-shape", "badshape.safetensors", ("badshape.safetensors", "shape")),
    ("label-kind-mismatch", "kind.safetensors", ("kind.safetensors", "soft labels")),
    ("empty-path", "''", ("''", "empty path")),
    ("unreadable", "unreadable.safetensors", ("unreadable.safetensors", "cannot be read")),
]


def _bad_set_cases() -> list:
    out = []
    consumers = [
        ("evaluate", f"evaluate {{}} {EV}"),
        ("show", "show {} --out new.png"),
        ("export-npz", "export {} --format npz --out new.npz"),
        ("export-folder", "export {} --format imagefolder --out newfolder"),
    ]
    for cid, template in consumers:
        for sid, fname, names in BAD_SETS:
            out.append(case(f"{cid}-set-{sid}", template.format(fname), *names, root_ok=sid != "unreadable"))
    out += [
        case("evaluate-set-of-unknown-dataset", f"evaluate unknownds.safetensors {EV}", "'nosuch'",
             "unknown dataset"),
        case("evaluate-set-of-vanished-imagefolder", f"evaluate goneif.safetensors {EV}", "gone-folder",
             "not found"),
        case("evaluate-set-of-mnist-missing-files", f"evaluate mnistset.safetensors {EV} --data-root emptyroot",
             "t10k-images-idx3-ubyte", "--download"),
    ]
    return out


def _bad_data_cases() -> list:
    data = [
        ("mnist-truncated", "mnist --data-root droot", ("train-images-idx3-ubyte", "truncated")),
        ("mnist-bad-magic", "mnist --data-root droot_magic", ("train-images-idx3-ubyte", "magic")),
        ("fashion-mnist-corrupt-gzip", "fashion-mnist --data-root droot", ("train-images-idx3-ubyte.gz", "gzip")),
        ("cifar10-corrupt-pickle", "cifar10 --data-root droot", ("cifar-10-batches-py", "not a valid CIFAR pickle")),
        ("cifar100-wrong-keys", "cifar100 --data-root droot", ("cifar-100-python", "missing key")),
        ("svhn-garbage", "svhn --data-root droot_svhn", ("train_32x32.mat", ".mat")),
        ("imagefolder-corrupt-png", "imagefolder:if_corrupt", ("if_corrupt/a/1.png", "cannot read image")),
        ("imagefolder-truncated-png", "imagefolder:if_trunc", ("if_trunc/a/1.png", "cannot read image")),
        ("imagefolder-empty-class", "imagefolder:if_empty_class", ("if_empty_class/b", "no images")),
        ("imagefolder-mixed-sizes", "imagefolder:if_sizes", ("if_sizes/b/1.png", "9x9")),
        ("mnist-unreadable", "mnist --data-root droot_unreadable", ("train-images-idx3-ubyte", "cannot read")),
        ("imagefolder-unreadable-png", "imagefolder:if_unreadable", ("if_unreadable/a/1.png", "cannot read")),
    ]
    out = []
    for did, ds, names in data:
        root_ok = "unreadable" not in did
        out.append(case(f"select-data-{did}", f"select --method random --dataset {ds} --ipc 1 --threads 1 "
                                              f"--out new.safetensors", *names, root_ok=root_ok))
    for did, ds, names in data[::3]:
        out.append(case(f"distill-data-{did}", f"distill --method dm --dataset {ds} --ipc 1 {DI} --out run_new",
                        *names, root_ok="unreadable" not in did))
    out += [
        case("baseline-data-imagefolder-test-class-unknown", f"baseline --dataset imagefolder:if_testbad {EV}",
             "if_testbad/test/zzz", "not a train class"),
        case("baseline-data-imagefolder-no-test-split", f"baseline --dataset imagefolder:if_notest {EV}",
             "if_notest", "no test split"),
    ]
    return out


CASES = _output_cases() + _number_cases() + _name_cases() + _bad_set_cases() + _bad_data_cases()


# ------------------------------------------------------------------------------------ the workspace

def _save_raw(path: Path, tensors: dict, header: dict | str | None) -> None:
    from safetensors.torch import save_file

    meta = None if header is None else {"tinyset": header if isinstance(header, str) else json.dumps(header)}
    save_file(tensors, str(path), metadata=meta)


def _build_workspace(ws: Path) -> None:
    """Every file the cases read, refuse to write, or must leave alone."""
    from PIL import Image
    from safetensors import safe_open

    os.chdir(ws)
    assert main(["select", "--method", "random", "--dataset", "digits", "--ipc", "2", "--threads", "1",
                 "--out", "good.safetensors"]) == 0
    good = (ws / "good.safetensors").read_bytes()
    with safe_open(str(ws / "good.safetensors"), framework="pt") as f:
        header = json.loads(f.metadata()["tinyset"])
        images, labels = f.get_tensor("images"), f.get_tensor("labels")

    # existing outputs and odd places
    for suffix in (".json", ".png", ".npz", ".safetensors"):
        (ws / f"existing{suffix}").write_bytes(b'{"keep": "me"}\n')
        (ws / f"ro_file{suffix}").write_bytes(b"read-only\n")
        (ws / f"ro_file{suffix}").chmod(0o444)
    (ws / "afile.txt").write_text("a regular file\n")
    (ws / "folder").mkdir()
    (ws / "userfolder").mkdir()
    (ws / "userfolder" / "notes.txt").write_text("the user's own file\n")
    os.mkfifo(ws / "fifo")
    (ws / "ro").mkdir()
    (ws / "emptyroot").mkdir()

    # bad synthetic sets
    (ws / "empty.safetensors").write_bytes(b"")
    (ws / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (ws / "trunc5.safetensors").write_bytes(good[:5])
    corrupt = bytearray(good)
    corrupt[40:80] = b"\xff" * 40
    (ws / "corrupt.safetensors").write_bytes(bytes(corrupt))
    (ws / "garbage.safetensors").write_bytes(bytes(range(256)) * 12)
    t = {"images": images, "labels": labels}
    _save_raw(ws / "nometa.safetensors", t, None)
    _save_raw(ws / "badjson.safetensors", t, "{not json")
    _save_raw(ws / "wrongformat.safetensors", t, dict(header, format="other.thing"))
    _save_raw(ws / "v99.safetensors", t, dict(header, format_version=99))
    _save_raw(ws / "badlabels.safetensors", {"images": images, "labels": labels + 50}, header)
    nan = images.clone()
    nan[0, 0, 0, 0] = float("nan")
    _save_raw(ws / "nan.safetensors", {"images": nan, "labels": labels}, header)
    _save_raw(ws / "nolabels.safetensors", {"images": images}, header)
    _save_raw(ws / "badshape.safetensors", {"images": images[:, 0], "labels": labels}, header)
    _save_raw(ws / "kind.safetensors", t, dict(header, label_kind="soft"))
    _save_raw(ws / "unknownds.safetensors", t, dict(header, info=dict(header["info"], name="nosuch")))
    _save_raw(ws / "goneif.safetensors", t, dict(header, info=dict(header["info"], name="imagefolder:gone-folder")))
    mn = torch.zeros(len(labels), 1, 28, 28)
    mnist_info = dict(header["info"], name="mnist", image_size=[28, 28], mean=[0.1307], std=[0.3081])
    _save_raw(ws / "mnistset.safetensors", {"images": mn, "labels": labels}, dict(header, info=mnist_info))

    # run folders
    for name in ("run_done", "run_badck", "run_truncck", "run_locked"):
        (ws / name).mkdir()
    (ws / "run_done" / "checkpoint.safetensors").write_bytes(good)
    (ws / "run_done" / "config.json").write_text("{}\n")
    (ws / "run_badck" / "checkpoint.safetensors").write_bytes(b"not a checkpoint" * 8)
    (ws / "run_truncck" / "checkpoint.safetensors").write_bytes(good[:100])
    (ws / "run_locked" / ".tinyset.lock").write_text(json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "started": "2024-01-01T00:00:00+00:00"}) + "\n")

    # settings files
    (ws / "table.toml").write_text("[dm]\nlr_img = 1.0\n")
    (ws / "badvalue.toml").write_text('lr_img = "fast"\n')
    (ws / "unknownkey.toml").write_text("nokey = 1\n")

    # corrupt dataset files
    raw = ws / "droot" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    dims = b"".join(n.to_bytes(4, "big") for n in (10, 28, 28))
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + dims + b"\x00" * 100)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + b"\x01" * 10)
    raw = ws / "droot_magic" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01" + dims + b"\x00" * 7840)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + b"\x01" * 10)
    raw = ws / "droot" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    (raw / "train-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    cifar = ws / "droot" / "cifar-10-batches-py"
    cifar.mkdir()
    for n in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
              "batches.meta"):
        (cifar / n).write_bytes(b"\x80\x04\x95 truncated pickle")
    cifar = ws / "droot" / "cifar-100-python"
    cifar.mkdir()
    for n in ("train", "test", "meta"):
        (cifar / n).write_bytes(pickle.dumps({"x": 1}, protocol=2))
    (ws / "droot_svhn").mkdir()
    for n in ("train_32x32.mat", "test_32x32.mat"):
        (ws / "droot_svhn" / n).write_bytes(b"MATLAB 5.0 MAT-file, but not really" * 8)

    # image folders
    def png(path: Path, size: int = 8) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (size, size), 128).save(path)

    for name in ("if_corrupt", "if_trunc", "if_empty_class", "if_sizes", "if_notest"):
        png(ws / name / "a" / "1.png")
        png(ws / name / "a" / "2.png")
    png(ws / "if_corrupt" / "b" / "1.png")
    (ws / "if_corrupt" / "a" / "1.png").write_bytes(b"this is not a PNG")
    png(ws / "if_trunc" / "b" / "1.png")
    data = (ws / "if_trunc" / "a" / "1.png").read_bytes()
    (ws / "if_trunc" / "a" / "1.png").write_bytes(data[: len(data) // 2])
    (ws / "if_empty_class" / "b").mkdir()
    (ws / "if_empty_class" / "b" / "readme.txt").write_text("no images here\n")
    png(ws / "if_sizes" / "b" / "1.png", size=9)
    png(ws / "if_notest" / "b" / "1.png")
    for cls in ("a", "b"):
        png(ws / "if_testbad" / "train" / cls / "1.png")
        png(ws / "if_testbad" / "train" / cls / "2.png")
    png(ws / "if_testbad" / "test" / "zzz" / "1.png")

    # files this process may not read (only meaningful when not root)
    (ws / "unreadable.safetensors").write_bytes(good)
    (ws / "unreadable.toml").write_text("lr_img = 1.0\n")
    raw = ws / "droot_unreadable" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + dims + b"\x00" * 7840)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + b"\x01" * 10)
    png(ws / "if_unreadable" / "a" / "1.png")
    png(ws / "if_unreadable" / "b" / "1.png")
    for p in (ws / "unreadable.safetensors", ws / "unreadable.toml", raw / "train-images-idx3-ubyte",
              ws / "if_unreadable" / "a" / "1.png"):
        p.chmod(0)
    (ws / "ro").chmod(0o555)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("fuzz")
    old = os.getcwd()
    old_threads = torch.get_num_threads()
    try:
        _build_workspace(ws)
    finally:
        os.chdir(old)
        torch.set_num_threads(old_threads)
    yield ws
    (ws / "ro").chmod(0o755)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: folders by name, files by size, mtime, mode and content hash."""
    snap: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = Path(dirpath, d)
            snap[str(p.relative_to(root))] = ("dir", stat.S_IMODE(p.lstat().st_mode))
        for f in filenames:
            p = Path(dirpath, f)
            st = p.lstat()
            digest = ""
            if stat.S_ISREG(st.st_mode):
                try:
                    digest = hashlib.sha1(p.read_bytes()).hexdigest()
                except PermissionError:  # a file of the workspace made unreadable on purpose
                    digest = "unreadable"
            snap[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode), digest)
    return snap


def error_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` without argparse's usage block (``usage:`` and its indented lines)."""
    lines, in_usage = [], False
    for line in stderr.splitlines():
        if line.startswith("usage:"):
            in_usage = True
            continue
        if in_usage and line.startswith(" "):
            continue
        in_usage = False
        if line.strip():
            lines.append(line)
    return lines


def run_inprocess(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse: usage errors exit 2
        status = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def check_failure(status: int, out: str, err: str, c: Case) -> str:
    assert status == c.status, f"exit status {status}, expected {c.status}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in out + err, err
    assert out == "", f"nothing should be printed to stdout on failure, got {out!r}"
    lines = error_lines(err)
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("tinyset"), line
    for name in c.names:
        assert name in line, f"{name!r} not named in: {line}"
    for text in PYTHON_REPRS:
        assert text not in line, f"Python repr {text!r} in: {line}"
    return line


def test_the_table_is_big_enough():
    assert len(CASES) >= 150
    ids = [p.id for p in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"


@pytest.mark.parametrize("c", CASES)
def test_bad_input(c: Case, workspace: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("TINYSET_DATA", str(workspace / "emptyroot"))
    monkeypatch.delenv("TINYSET_THREADS", raising=False)
    before = snapshot(workspace)
    status, out, err = run_inprocess(shlex.split(c.argv), capsys)
    after = snapshot(workspace)
    check_failure(status, out, err, c)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"files created, changed or removed: {changed}"


# ------------------------------------------------------------------------------------ real processes

def _env() -> dict[str, str]:
    env = dict(os.environ, TINYSET_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("TINYSET_DATA", None)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tinyset.cli", *args]


@pytest.mark.parametrize("argv,names", [
    ("evaluate good.safetensors --lr inf", ("--lr", "'inf'")),
    ("frobnicate", ("'frobnicate'",)),
], ids=["bad-number", "unknown-command"])
def test_process_exit_status(argv: str, names: tuple[str, ...], workspace: Path) -> None:
    before = snapshot(workspace)
    proc = subprocess.run(_cli(*shlex.split(argv)), cwd=workspace, env=_env(), capture_output=True, text=True,
                          timeout=120)
    check_failure(proc.returncode, proc.stdout, proc.stderr, Case(argv, names))
    assert snapshot(workspace) == before


def _default_sigint() -> None:
    """In the child: SIGINT back to its default, so that Python installs its Ctrl-C handler even when
    the test runs in a background job (whose SIGINT is ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_distill(out: Path, iterations: int = 100_000) -> subprocess.Popen:
    return subprocess.Popen(
        _cli("distill", "--method", "dm", "--dataset", "digits", "--ipc", "1", "--iterations", str(iterations),
             "--batch-real", "4", "--model", "convnet-d1", "--final-eval", "off", "--precision", "fp32",
             "--checkpoint-every", "1000000", "--set", "compile=off", "--out", str(out)),
        cwd=out.parent, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_default_sigint)


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended early with status {proc.returncode}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            pytest.fail("the run did not get going in time")
        time.sleep(0.05)


def test_sigterm_during_distill_loop_saves_and_exits_143(tmp_path: Path) -> None:
    """SIGTERM while iterating: the loop checkpoints and stops (the same path as Ctrl-C, 128 + 2)."""
    signum, status = signal.SIGTERM, 143
    out = tmp_path / "run"
    proc = _start_distill(out)
    metrics = out / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, proc)
    proc.send_signal(signum)
    try:
        stdout, stderr = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the run did not stop after the signal")
    line = check_failure(proc.returncode, stdout, stderr,
                         Case("distill", (f"signal {int(signum)}", "checkpoint saved", "--resume"), status=status))
    assert str(out / "checkpoint.safetensors") in line
    assert (out / "checkpoint.safetensors").is_file()
    assert not (out / "synset.safetensors").exists()
    assert not (out / ".tinyset.lock").exists()


def _catches(pid: int, *signums: int) -> bool:
    """Whether process ``pid`` has handlers for all of ``signums`` (``SigCgt`` of /proc/PID/status)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next((ln.split()[1] for ln in text.splitlines() if ln.startswith("SigCgt:")), "0"), 16)
    return all(caught & (1 << (s - 1)) for s in signums)


@pytest.mark.skipif(not HAS_PROC, reason="needs Linux /proc to see when the handlers are installed")
@pytest.mark.parametrize("signum,status,names", [
    (signal.SIGTERM, 143, ("SIGTERM", "signal 15")),
    (signal.SIGINT, 130, ("interrupted", "Ctrl-C")),
], ids=["SIGTERM-143", "SIGINT-130"])
def test_signal_while_starting(signum: int, status: int, names: tuple[str, ...], tmp_path: Path) -> None:
    """A signal while the command starts (importing torch, reading data) also ends it with one line and
    128 + the signal number, and nothing written. Sent once tinyset's SIGTERM handler is installed."""
    out = tmp_path / "run"
    proc = _start_distill(out)
    _wait_for(lambda: _catches(proc.pid, signal.SIGTERM, signal.SIGINT), proc)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    check_failure(proc.returncode, stdout, stderr, Case("distill", names, status=status))
    assert not out.exists()
