"""Would a Winograd convolution make the fp32 path faster? A probe behind issue #12's AVX2 targets.

On a CPU without native bf16, DM's iteration is bound by the forward pass of its real batch through
the 128-channel 3x3 convolutions, which oneDNN's direct kernel already runs near the CPU's fp32 peak
(docs/measurements.md). Only fewer multiplications could go faster: Winograd's F(4x4, 3x3) computes
a 4x4 output tile with 36 products per input/output channel pair instead of 144. This script writes
that algorithm in plain PyTorch (tile gather, the input and output transforms as small matrix
products with the Kronecker products of Lavin & Gray's matrices, one batched matrix product over the
36 tile positions), checks it against a float64 convolution, and races it against ``F.conv2d`` in
alternating turns (``racing.race``; the machine may be shared, so the ratio is the figure).

It is a probe, not a code path of tinyset: if the ratio is below 1 on a CPU, the transforms cost
more than the saved products there. Printed: the CPU line, per case the median CPU seconds of both,
the ratio (above 1: Winograd is faster) and both maximum relative errors against float64.

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python benchmarks/probe_winograd.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from racing import race  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tinyset.runtime import describe_machine, resolve_runtime  # noqa: E402

#: F(4x4, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016):
#: output tile = A^T [(G g G^T) * (B^T d B)] A for a 6x6 input tile d and a 3x3 filter g
B_T = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
     (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
A_T = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))

#: (images, channels, height): the 128-channel layers of DM's real batch on MNIST (28, 14 and 7 pixels)
CASES = ((256, 128, 28), (256, 128, 14), (256, 128, 7))


def filter_transform(w: torch.Tensor) -> torch.Tensor:
    """``[K, C, 3, 3]`` filters -> ``[36, C, K]``: G g G^T for every pair, positions first."""
    g = torch.tensor(G, dtype=torch.float64)
    u = torch.einsum("ai,kcij,bj->abck", g, w.double(), g)
    return u.reshape(36, w.shape[1], w.shape[0]).to(w.dtype)


def winograd_conv3x3(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, w, padding=1)`` for 3x3 filters by F(4x4, 3x3); ``u = filter_transform(w)``."""
    n, c, h, w = x.shape
    k = u.shape[-1]
    th, tw = -(-h // 4), -(-w // 4)  # tiles per side; the grid is cropped back to h x w
    xp = F.pad(x, (1, 1 + 4 * tw - w, 1, 1 + 4 * th - h))
    tiles = xp.unfold(2, 6, 4).unfold(3, 6, 4)  # [n, c, th, tw, 6, 6]
    d = tiles.permute(4, 5, 0, 2, 3, 1).reshape(36, n * th * tw * c)
    bt = torch.tensor(B_T, dtype=x.dtype)
    v = (torch.kron(bt, bt) @ d).view(36, n * th * tw, c)
    m = torch.bmm(v, u)  # [36, tiles, k]: the only products that scale with c * k
    at = torch.tensor(A_T, dtype=x.dtype)
    y = (torch.kron(at, at) @ m.view(36, -1)).view(4, 4, n, th, tw, k)
    return y.permute(2, 5, 3, 0, 4, 1).reshape(n, k, 4 * th, 4 * tw)[:, :, :h, :w]


def max_rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--cases", default=None, help="comma-separated IMAGES:CHANNELS:SIZE (default: DM's three layers)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    runtime = resolve_runtime("cpu", "fp32", threads=args.threads)
    print(describe_machine(runtime), flush=True)
    cases = CASES if args.cases is None else tuple(tuple(int(v) for v in c.split(":")) for c in args.cases.split(","))
    rows = []
    for n, c, size in cases:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, c, size, size, generator=gen)
        w = torch.randn(c, c, 3, 3, generator=gen) / (3 * c ** 0.5)
        u = filter_transform(w)
        ref = F.conv2d(x.double(), w.double(), padding=1)
        errors = {"direct": max_rel_error(F.conv2d(x, w, padding=1), ref),
                  "winograd": max_rel_error(winograd_conv3x3(x, u), ref)}
        label = f"fp32 {c}->{c} 3x3 at {size}x{size}, {n} images"
        contenders = {"direct": ("F.conv2d (oneDNN)", lambda: F.conv2d(x, w, padding=1)),
                      "winograd": ("F(4x4,3x3) in PyTorch", lambda: winograd_conv3x3(x, u))}
        cpu: dict[str, list[float]] = {}
        race(label, contenders, args.reps, cpu)
        med = {name: statistics.median(ts) for name, ts in cpu.items()}
        ratio = med["direct"] / med["winograd"]
        print(f"{label}: direct {med['direct'] * 1e3:.1f} ms, winograd {med['winograd'] * 1e3:.1f} ms (CPU "
              f"medians): winograd {ratio:.2f}x the direct kernel's speed; max relative error against float64: "
              f"direct {errors['direct']:.1e}, winograd {errors['winograd']:.1e}", flush=True)
        rows.append({"images": n, "channels": c, "size": size, "cpu_seconds": med, "cpu_turns": cpu,
                     "winograd_speedup": ratio, "max_rel_error": errors, "threads": runtime.threads})
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": describe_machine(runtime), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
