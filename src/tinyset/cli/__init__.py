"""The ``tinyset`` command line: one small module per subcommand, registered in :data:`COMMANDS`.

Each module has ``HELP``, ``add_arguments(parser)`` and ``run(args) -> exit status``. Device,
precision and threads are resolved once here (:func:`tinyset.runtime.resolve_runtime`) and passed
down as ``args.runtime``. Bad input exits with status 2 and a one-line message; a run stopped by a
signal exits with 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from typing import Sequence

from tinyset import __version__
from tinyset.errors import Interrupted, TinysetError
from tinyset.registry import Registry

#: subcommand name -> module path (in the order ``--help`` lists them)
COMMANDS: Registry = Registry("command")
for _name in ("datasets", "models", "methods", "select", "experts", "distill", "sample", "evaluate", "baseline", "show",
              "export"):
    COMMANDS.register(_name, f"tinyset.cli.{_name}", help=f"tinyset {_name}")
_ORDER = ("datasets", "models", "methods", "select", "experts", "distill", "sample", "evaluate", "baseline", "show",
          "export")

EPILOG = """examples:
  tinyset distill --method dm --dataset digits --ipc 10          # no download, well under a minute
  tinyset methods dc                                             # a method's settings and paper table
  tinyset select --method random --dataset mnist --ipc 10 --out runs/random10.safetensors
  tinyset evaluate runs/random10.safetensors --models convnet,mlp --num-models 5
  tinyset baseline --dataset mnist
  tinyset show runs/random10.safetensors --out grid.png
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tinyset", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Dataset distillation and coreset selection: learn or pick a few images per class, "
                    "then evaluate them by training fresh networks on them.")
    parser.add_argument("--version", action="version", version=f"tinyset {__version__}")
    # not required=True: argparse would then report a missing command before an unknown option, and
    # `tinyset --frobnicate` would not name --frobnicate; main() reports a missing command itself
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _ORDER:
        mod = importlib.import_module(COMMANDS.get(name))
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(fn=mod.run)
    return parser


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM outside a distillation loop (which installs its own handler): stop like Ctrl-C."""
    raise Interrupted(signum, f"stopped by SIGTERM (signal {signum})")


def _install_sigterm() -> object:
    """Route SIGTERM to :func:`_on_sigterm` (main thread only); returns the previous handler or None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        return signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # pragma: no cover - no signals here
        return None


def main(argv: Sequence[str] | None = None) -> int:
    old_sigterm = None
    prog = "tinyset"
    try:  # the handler is installed inside the try: a signal right after it must reach the handlers below
        old_sigterm = _install_sigterm()
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.error("the following arguments are required: COMMAND (see `tinyset --help`)")
        prog = f"tinyset {args.command}"
        if hasattr(args, "device"):
            from tinyset.runtime import resolve_runtime, tune_allocator

            args.runtime = resolve_runtime(args.device, getattr(args, "precision", "auto"), args.threads)
            tune_allocator()
        return int(args.fn(args) or 0)
    except TinysetError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"{prog}: {exc.message or 'interrupted'}", file=sys.stderr)
        return 128 + int(exc.signum)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C); nothing was saved", file=sys.stderr)
        return 128 + int(signal.SIGINT)
    finally:
        if old_sigterm is not None:
            signal.signal(signal.SIGTERM, old_sigterm)  # type: ignore[arg-type]


def entry() -> None:  # pragma: no cover - exercised through real processes in tests/test_fuzz_cli.py
    """The ``tinyset`` program: :func:`main`, then exit with its status. After a signal (status 130 or
    143) the process ends at once with ``os._exit``, once stdout and stderr are flushed: every file was
    already written atomically or not at all, and skipping interpreter shutdown keeps the status
    128 + N (under load a fresh-clone CI run saw one Ctrl-C during start-up end as a SIGINT death,
    -2, after the message had been printed)."""
    status = main()
    if status in (128 + int(signal.SIGINT), 128 + int(signal.SIGTERM)):
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C now must not change the status
        except (ValueError, OSError):
            pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":  # pragma: no cover
    entry()
