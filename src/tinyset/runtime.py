"""Runtime: devices, numeric precision, autocast, threads, CPU description and the allocator.

Resolved once at the command line (or by the caller of the library functions) with
:func:`resolve_runtime` and passed down; :meth:`Runtime.to_dict` is what a run records in its
config, and :func:`describe_machine` is the one-line machine description printed beside timings.

Paths are chosen per device:

* precision ``auto``: bf16 autocast only on a CPU with native bf16 (AVX512-BF16 or AMX, and torch
  running its AVX512/AMX kernels); fp32 on CUDA, where bf16 autocast was measured slower than fp32
  for these small networks (launch-bound, not math-bound);
* the first convolution's im2col matrix product (:class:`tinyset.models.layers.Conv2d`) on CPU
  only, inside compiled graphs (on CUDA it costs thousands of extra kernel launches per DM
  iteration; in eager CPU code oneDNN's direct kernel is faster): :func:`im2col_first_conv`;
* threads: ``--threads`` / ``TINYSET_THREADS`` / the CPUs this process may actually use (affinity
  and cgroup quota), so a container limited to 2 CPUs on a 64-core host does not start 64 threads.

Runs on CPU are bit-repeatable (same seed, same result, and resume continues exactly); on CUDA
they are not (atomic-add reductions in cuDNN/cuBLAS backward kernels), DM in particular: a resumed
or repeated CUDA run agrees only up to floating-point noise.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import numbers
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

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


# --------------------------------------------------------------------------- CPU description

#: the x86 flags (``/proc/cpuinfo``) that decide which precision path is native
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
#: torch CPU capabilities whose kernels use AVX512-BF16/AMX instructions for bf16
_BF16_CAPABILITIES = ("AVX512", "AMX")
#: environment variable read by :func:`resolve_threads` when no explicit count is given
THREADS_ENV = "TINYSET_THREADS"


@dataclass(frozen=True)
class CpuInfo:
    """What the CPU is and how much of it this process may use.

    ``logical_cpus`` is ``os.cpu_count()`` (the whole machine); ``affinity_cpus`` the CPUs in this
    process's affinity mask; ``cgroup_cpus`` the cgroup CPU quota rounded up (None: no quota);
    ``available_cpus`` the smaller of the last two, at least 1.
    """

    model: str
    avx2: bool
    avx512f: bool
    avx512_bf16: bool
    amx_bf16: bool
    amx_tile: bool
    capability: str  # torch.backends.cpu.get_cpu_capability(): DEFAULT, AVX2, AVX512, ...
    logical_cpus: int
    affinity_cpus: int
    cgroup_cpus: int | None
    available_cpus: int

    def flags(self) -> list[str]:
        """The flags of :data:`CPU_FLAGS` this CPU has."""
        return [f for f in CPU_FLAGS if getattr(self, f)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _torch_cpu_capability() -> str:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - very old torch
        return "unknown"


def _read_text(path: str | os.PathLike) -> str | None:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return None


def parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """``(model name, flags)`` from the text of ``/proc/cpuinfo`` (first processor's entries)."""
    model: str | None = None
    flags: set[str] | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "model name" and model is None:
            model = value.strip() or None
        elif key in ("flags", "features") and flags is None:  # x86 "flags", arm64 "Features"
            flags = set(value.split())
        if model is not None and flags is not None:
            break
    return model, flags or set()


def parse_cpu_max(text: str) -> int | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` ("quota period" or "max period"): ceil(quota/period),
    at least 1; None when unlimited or unreadable."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100_000
    except ValueError:
        return None
    return _quota_cpus(quota, period)


def parse_cfs_quota(quota_text: str, period_text: str) -> int | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1: none)."""
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        return None
    return _quota_cpus(quota, period)


def _quota_cpus(quota: int, period: int) -> int | None:
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


def _cgroup_dirs(base: Path, rel: str) -> list[Path]:
    """``base/rel`` and its ancestors up to ``base`` (a limit set on a parent cgroup applies too)."""
    rel = rel.strip().lstrip("/")
    here = base / rel if rel else base
    if not here.is_dir():  # path from another cgroup namespace: only the mount root is ours
        return [base]
    dirs = [here]
    while here != base and base in here.parents:
        here = here.parent
        dirs.append(here)
    return dirs


def cgroup_cpu_limit(cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
                     self_cgroup: str | os.PathLike = "/proc/self/cgroup") -> int | None:
    """CPUs this process's cgroup quota allows (rounded up), None when there is no quota.

    Reads cgroup v2 ``cpu.max`` and cgroup v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` in the
    process's cgroup (from ``self_cgroup``) and its ancestors under ``cgroup_root``; the smallest
    limit wins.
    """
    root = Path(cgroup_root)
    v2_rel, v1_rel = "", ""
    for line in (_read_text(self_cgroup) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2_rel = parts[2]
        elif "cpu" in parts[1].split(","):
            v1_rel = parts[2]
    limits: list[int] = []
    for d in _cgroup_dirs(root, v2_rel):
        text = _read_text(d / "cpu.max")
        if text is not None and (n := parse_cpu_max(text)) is not None:
            limits.append(n)
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        base = root / mount
        if not base.is_dir():
            continue
        for d in _cgroup_dirs(base, v1_rel):
            quota, period = _read_text(d / "cpu.cfs_quota_us"), _read_text(d / "cpu.cfs_period_us")
            if quota is not None and period is not None and (n := parse_cfs_quota(quota, period)) is not None:
                limits.append(n)
        break
    return min(limits) if limits else None


def _affinity_count(affinity: Iterable[int] | None) -> int:
    if affinity is not None:
        return len(set(affinity))
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # pragma: no cover - macOS/Windows


def available_cpus(cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
                   self_cgroup: str | os.PathLike = "/proc/self/cgroup",
                   affinity: Iterable[int] | None = None) -> int:
    """CPUs this process may actually use: its affinity mask (``affinity``, default
    ``os.sched_getaffinity(0)``) capped by the cgroup CPU quota; at least 1."""
    n = _affinity_count(affinity)
    limit = cgroup_cpu_limit(cgroup_root, self_cgroup)
    return max(1, min(n, limit) if limit is not None else n)


def cpu_info(cpuinfo_path: str | os.PathLike = "/proc/cpuinfo",
             cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
             self_cgroup: str | os.PathLike = "/proc/self/cgroup",
             *, affinity: Iterable[int] | None = None, capability: str | None = None,
             logical_cpus: int | None = None) -> CpuInfo:
    """Describe this machine's CPU (the paths and the keyword arguments exist for tests).

    The model comes from ``model name`` in ``cpuinfo_path`` (else ``platform.processor()``), the
    flags of :data:`CPU_FLAGS` from its ``flags`` line, ``capability`` from
    ``torch.backends.cpu.get_cpu_capability()``. Nothing is cached.
    """
    model, flags = parse_cpuinfo(_read_text(cpuinfo_path) or "")
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    affinity_n = _affinity_count(affinity)
    limit = cgroup_cpu_limit(cgroup_root, self_cgroup)
    return CpuInfo(
        model=model,
        **{f: f in flags for f in CPU_FLAGS},
        capability=capability if capability is not None else _torch_cpu_capability(),
        logical_cpus=logical_cpus if logical_cpus is not None else (os.cpu_count() or 1),
        affinity_cpus=affinity_n,
        cgroup_cpus=limit,
        available_cpus=max(1, min(affinity_n, limit) if limit is not None else affinity_n),
    )


@functools.lru_cache(maxsize=1)
def _host_cpu_flags() -> CpuInfo:
    """This host's CPU, cached for the flag checks of :func:`native_bf16` (flags and torch's
    capability do not change while the process runs; CPU counts may, so :func:`cpu_info` and
    :func:`describe_machine` always read afresh)."""
    return cpu_info()


# --------------------------------------------------------------------------- per-device paths

def _as_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a valid torch device ({exc})") from None


def native_bf16(device: str | torch.device, cpu: CpuInfo | None = None) -> bool:
    """Whether ``device`` runs bfloat16 natively.

    CPU: the CPU has AVX512-BF16 or AMX-BF16 *and* torch runs its AVX512/AMX kernels (otherwise
    bf16 is emulated in fp32 and slower than fp32). ``cpu`` defaults to this host.
    CUDA: ``torch.cuda.is_bf16_supported()``. Other devices: False.
    """
    dev = _as_device(device)
    if dev.type == "cpu":
        info = cpu if cpu is not None else _host_cpu_flags()
        return (info.avx512_bf16 or info.amx_bf16) and info.capability in _BF16_CAPABILITIES
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return False


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bfloat16 matrix support (see :func:`native_bf16`)."""
    return native_bf16(torch.device("cpu"))


PRECISIONS = ("auto", "fp32", "bf16")


def _precision_choice(precision: str, device: str | torch.device,
                      cpu: CpuInfo | None = None) -> tuple[str, str]:
    """``(precision, reason)``; see :func:`resolve_precision`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    dev = _as_device(device)
    if precision != "auto":
        if precision == "bf16" and dev.type == "cpu":
            info = cpu if cpu is not None else _host_cpu_flags()
            if not native_bf16(dev, info):
                return precision, f"requested (no native bf16 on this CPU ({info.capability}): emulated)"
        return precision, "requested"
    if dev.type == "cuda":
        return "fp32", "auto: fp32 on CUDA (bf16 autocast measured slower)"
    if dev.type != "cpu":
        return "fp32", f"auto: fp32 on {dev.type}"
    info = cpu if cpu is not None else _host_cpu_flags()
    if native_bf16(dev, info):
        return "bf16", "auto: native AMX-BF16" if info.amx_bf16 else "auto: native AVX512-BF16"
    if info.avx512_bf16 or info.amx_bf16:
        return "fp32", (f"auto: CPU has bf16 instructions but torch runs {info.capability} kernels "
                        f"(bf16 would be emulated)")
    return "fp32", f"auto: no native bf16 on this CPU ({info.capability})"


def resolve_precision(precision: str, device: str | torch.device, cpu: CpuInfo | None = None) -> str:
    """The autocast precision to run: ``"fp32"`` or ``"bf16"``.

    ``auto``:

    * CPU: ``bf16`` only where the CPU runs it natively (:func:`native_bf16`: AVX512-BF16 or AMX
      and torch's AVX512/AMX kernels), else ``fp32`` (an AVX2-only CPU would emulate bf16);
    * CUDA: ``fp32``. bf16 autocast was measured *slower* than fp32 on GPU for tinyset's small
      networks: they are bound by kernel launches, not arithmetic, and autocast adds cast kernels.
      No CUDA API is called for this choice. Ask for ``bf16`` explicitly to use it anyway;
    * other devices: ``fp32``.

    An explicit ``fp32`` or ``bf16`` is honoured on every device. ``cpu`` overrides the host's
    CPU description (for tests).
    """
    return _precision_choice(precision, device, cpu)[0]


def im2col_first_conv(device: str | torch.device) -> bool:
    """Whether the first convolution (tiny receptive field) runs as an im2col matrix product: only on
    CPU, and only inside a graph ``torch.compile`` is tracing.

    * Compiled CPU graphs: inductor fuses the bias and the layout change into the matrix product.
      Measured (``python benchmarks/bench_first_conv.py --compiled``, one thread, 1 -> 128 channels):
      1.24-1.27x faster than oneDNN's direct kernel in bf16 on an AMX CPU; on an AVX2-only AMD EPYC
      in fp32, 20 epochs of 5 compiled ConvNets on 100 MNIST images took 61-69 CPU-s with it, 75-84
      without.
    * Eager CPU code (the KRR pool, the GAN, DC's synthetic side, ...): never. oneDNN's direct kernel
      was faster for the layer (forward and backward) on every CPU measured: im2col ran at
      0.41-0.48x its speed on AVX2 (fp32), 0.45-0.67x in fp32 and 0.69-0.74x in bf16 on AVX512 with
      AMX; a whole KRR iteration on the AMX CPU ran 1.24x faster without it.
    * CUDA and other devices: never. It was measured to cost ~2,950 extra kernel launches per DM
      iteration and 42% of GPU time (DM ~2x faster without it, DC/DSA 1.2x).

    Both paths compute the same function (up to rounding). A plain check of the device type and of
    ``torch.compiler.is_compiling()``, so it traces under ``torch.compile``.
    """
    dev = device if isinstance(device, torch.device) else _as_device(device)
    return dev.type == "cpu" and torch.compiler.is_compiling()


#: images times ensemble members per gradient-free forward pass on a CPU
CPU_FORWARD_CHUNK = 32


def forward_chunk(device: str | torch.device, members: int = 1) -> int | None:
    """How many images a gradient-free forward pass of a large batch takes at a time.

    * CPU: about :data:`CPU_FORWARD_CHUNK` (32) image-networks per pass, i.e. ``round(32 / members)``
      images for a ``members``-wide ensemble (at least 1). Then a block's activations stay in the
      core's cache between the convolution and the fused norm/ReLU/pool kernel; for a few hundred
      images they go to memory and back. Measured with compiled ConvNets on MNIST, one thread:
      DM's real embeddings (2,560 images, 1 member) 1.13 -> 0.46 CPU-s in bf16 on an AMX Xeon and
      3.57 -> 2.93 in fp32 with AVX2 kernels (chunks of 256 -> 32; 8 and 16 were no better); a test
      pass of 5 members over 2,000 images 5.4 -> 2.5-2.6 CPU-s in bf16 and 25 -> 14 in fp32 with
      AVX2 kernels (batches of 1000 -> 6-8). Outputs are the same up to rounding (bit-identical for
      DM's embeddings).
    * CUDA and other devices: None (one large pass; more launches would only cost).

    In train mode only for networks without BatchNorm (:func:`tinyset.models.layers.mixes_images`).
    """
    if _as_device(device).type != "cpu":
        return None
    return max(1, round(CPU_FORWARD_CHUNK / max(1, members)))


# --------------------------------------------------------------------------- threads

def resolve_threads(threads: int | None = None, environ: Mapping[str, str] | None = None,
                    cpu_count: int | None = None) -> int:
    """Intra-op threads to use: ``threads`` (``--threads``) if given, else ``$TINYSET_THREADS``,
    else :func:`available_cpus` (``cpu_count`` overrides it, for tests).

    On a shared machine set ``--threads`` (or ``TINYSET_THREADS``) to your share of the cores:
    more threads than free cores oversubscribes them, and one competing process was measured to
    slow a run 9-25x. A count that is not a positive integer raises :class:`ConfigError` naming
    where it came from.
    """
    if threads is not None:
        if (isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1
                or threads > MAX_THREADS):
            raise ConfigError(f"--threads must be an integer from 1 to {MAX_THREADS}; got {threads!r}")
        return int(threads)
    env = os.environ if environ is None else environ
    raw = env.get(THREADS_ENV)
    if raw is not None and raw.strip():
        try:
            n = int(raw.strip())
        except ValueError:
            n = 0
        if n < 1 or n > MAX_THREADS:
            raise ConfigError(f"environment variable {THREADS_ENV}={raw!r} must be an integer from 1 to "
                              f"{MAX_THREADS} (number of threads)")
        return n
    return cpu_count if cpu_count is not None else available_cpus()


#: the most threads tinyset sets (the command line's --threads has the same bound)
MAX_THREADS = 1024


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count to :func:`resolve_threads` ``(threads)``; returns it."""
    n = resolve_threads(threads)
    torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------- the resolved runtime

@dataclass(frozen=True)
class Runtime:
    """Device, precision and threads of one run, resolved once (see :func:`resolve_runtime`).

    ``bit_repeatable``: whether the same seed gives bit-identical results (and resume continues a
    run exactly). True on CPU; False on CUDA, whose backward kernels reduce with atomic adds in
    varying order (DM especially): CUDA runs agree only up to floating-point noise.
    """

    device: torch.device
    precision: str
    precision_reason: str
    threads: int
    bit_repeatable: bool
    cpu: CpuInfo

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the run's config."""
        return {"device": str(self.device), "precision": self.precision,
                "precision_reason": self.precision_reason, "threads": self.threads,
                "bit_repeatable": self.bit_repeatable,
                "cpu": self.cpu.to_dict()}


def resolve_runtime(device: str | torch.device | None = "auto", precision: str = "auto",
                    threads: int | None = None, configure: bool = True,
                    cpu: CpuInfo | None = None) -> Runtime:
    """Resolve device (:func:`resolve_device`), precision (:func:`resolve_precision`), threads
    (:func:`resolve_threads`) and the per-device paths once.

    ``configure=True`` sets torch's thread count (:func:`configure_threads`) and records it;
    ``configure=False`` leaves torch alone (``threads`` is still validated) and records the count
    torch currently uses, which is the one that will run. ``cpu`` overrides the host description
    (for tests).
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(dev)!r} was asked for but CUDA is not available on this machine")
    info = cpu if cpu is not None else cpu_info()
    prec, reason = _precision_choice(precision, dev, info)
    if configure:
        n = resolve_threads(threads, cpu_count=info.available_cpus)
        torch.set_num_threads(n)
    else:
        resolve_threads(threads, cpu_count=info.available_cpus)
        n = torch.get_num_threads()
    return Runtime(device=dev, precision=prec, precision_reason=reason, threads=n,
                   bit_repeatable=dev.type == "cpu", cpu=info)


def describe_machine(runtime: Runtime | None = None) -> str:
    """One line describing where a timing ran, e.g.

    ``CPU: AMD EPYC 9R14 | avx2 avx512f avx512_bf16, no amx | torch capability AVX512 |
    threads 2 (2 available, 2 logical) | precision bf16 (auto: native AVX512-BF16)``

    Without ``runtime``: this CPU, torch's current thread count and what precision ``auto`` picks
    on CPU. A non-CPU device is appended (with its name for CUDA).
    """
    rt = runtime if runtime is not None else resolve_runtime("cpu", "auto", configure=False)
    c = rt.cpu
    flags = c.flags()
    amx = [f for f in flags if f.startswith("amx")]
    parts = [f for f in flags if not f.startswith("amx")]
    flag_text = " ".join(parts) if parts else "no avx2/avx512"
    flag_text += ", " + (" ".join(amx) if amx else "no amx")
    line = (f"CPU: {c.model} | {flag_text} | torch capability {c.capability} | "
            f"threads {rt.threads} ({c.available_cpus} available, {c.logical_cpus} logical) | "
            f"precision {rt.precision} ({rt.precision_reason})")
    if rt.device.type != "cpu":
        name = ""
        if rt.device.type == "cuda" and torch.cuda.is_available():
            name = f" ({torch.cuda.get_device_name(rt.device)})"
        line += f" | device {rt.device}{name}, {'bit-repeatable' if rt.bit_repeatable else 'not bit-repeatable'}"
    return line


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for the forward pass (parameters and optimiser stay fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- torch.compile

@functools.cache
def _vector_bits() -> int | None:
    """Width in bits of the vector ISA inductor generates CPU code for here (it follows
    ``ATEN_CPU_CAPABILITY`` when that is set), or None where it cannot be told."""
    try:
        from torch._inductor import cpu_vec_isa

        isa = cpu_vec_isa.pick_vec_isa()
    except Exception:  # a torch without this module, or no compiler: nothing to pin
        return None
    bits = isa.bit_width() if isa else 0
    return bits or None


def compile_options() -> dict[str, Any] | None:
    """Inductor options for every ``torch.compile`` call of tinyset: the vector width of the CPU code.

    Why: torch 2.13's compiled-graph cache does not tell apart graphs generated for different vector
    ISAs on the same CPU. Generate a graph under ``ATEN_CPU_CAPABILITY=avx2`` (8-float loops), run the
    same graph later without it, and the cached loops are rebuilt with AVX512 flags (16-float
    vectors): every vector store then writes 8 floats past its buffer. Observed on an AMX Xeon as
    ``free(): invalid pointer`` in an fp32 DM run after an AVX2-kernel benchmark; the other way round
    the loops leave half of every buffer unwritten (NaN outputs, 15x slower). Naming the width
    (``cpp.simdlen``, which selects the same ISA inductor would pick) puts it in the cache key, so each
    ISA gets its own entries. The generated code is unchanged.
    """
    bits = _vector_bits()
    return {"cpp.simdlen": bits} if bits else None


def compile_function(fn, **kwargs: Any):
    """``torch.compile(fn, dynamic=False, options=compile_options(), **kwargs)``: the one way tinyset
    compiles (see :func:`compile_options` for the one option it sets)."""
    kwargs.setdefault("dynamic", False)
    options = compile_options()
    if options and kwargs.get("backend", "inductor") == "inductor":
        kwargs["options"] = {**options, **kwargs.get("options", {})}
    return torch.compile(fn, **kwargs)
