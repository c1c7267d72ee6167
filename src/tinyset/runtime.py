"""Runtime: devices, numeric precision, autocast, threads and the memory allocator.

Resolved once at the command line (or by the caller of the library functions) and passed down.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from pathlib import Path

import torch

from tinyset.errors import ConfigError


def tune_allocator() -> bool:
    """Keep freed memory in the process instead of returning it to the OS (glibc only).

    Training steps allocate and free activations larger than glibc's mmap threshold every step;
    by default each such block is a fresh mmap whose pages the kernel must zero again, which costs
    about a fifth of a CPU training step here. Disabling mmap for large blocks and trimming keeps
    them in the heap for reuse (peak memory stays reserved). Called by the ``tinyset`` command and
    the benchmarks; set ``TINYSET_NO_MALLOC_TUNING=1`` to skip. Returns whether it was applied.
    """
    if os.environ.get("TINYSET_NO_MALLOC_TUNING") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        ok = libc.mallopt(m_mmap_max, 0) == 1
        ok = libc.mallopt(m_trim_threshold, 2**31 - 1) == 1 and ok
        return ok
    except (OSError, AttributeError):
        return False


def resolve_device(device: str | None) -> torch.device:
    """``auto`` -> cuda if available else cpu; anything else is checked to exist."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r} is not a valid torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r} was asked for but CUDA is not available on this machine")
    return dev


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 matrix support (AVX512-BF16 or AMX)."""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        return False
    if cap not in ("AVX512", "AMX"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # pragma: no cover - non-Linux
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the hardware runs it natively, else fp32."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"precision must be one of auto, fp32, bf16; got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for the forward pass (parameters and optimiser stay fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
