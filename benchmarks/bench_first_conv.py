"""The first convolution's two CPU paths, timed side by side: oneDNN's direct ``F.conv2d`` against
the im2col matrix product of :class:`tinyset.models.layers.Conv2d`, in eager code and (``--compiled``)
inside ``torch.compile``. This is the measurement behind :func:`tinyset.runtime.im2col_first_conv`.

Each case is a layer of the shape the first ConvNet block has on MNIST (1 input channel, 28x28
padded by 3): forward, ReLU, sum and backward, with the input requiring a gradient (as synthetic
images do) or not (``--no-input-grad``: real images). The two paths race in alternating turns in
one process (``racing.race``; the machine may be shared, so the ratio is the figure, not the
seconds); printed: the CPU line, the median seconds per pass and the speed-up of im2col against the
direct kernel (above 1: im2col is faster).

    python benchmarks/bench_first_conv.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from racing import race_report  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tinyset.models.layers import Conv2d  # noqa: E402
from tinyset.runtime import autocast, describe_machine, resolve_runtime  # noqa: E402

#: (output channels, images, members): the KRR pool at width 64, DM / evaluation batches at width 128,
#: five evaluation members at once, the MTT/selection width 32
CASES = ((64, 320, 1), (128, 256, 1), (128, 100, 5), (32, 256, 1))


def passes(conv: Conv2d, x: torch.Tensor, compiled: bool, precision: str = "fp32"):
    dev = torch.device("cpu")

    def im2col():
        with autocast(dev, precision):
            y = conv._forward_matmul(x, conv.bias)
        y.float().relu().sum().backward()

    def direct():
        with autocast(dev, precision):
            y = F.conv2d(x, conv.weight, conv.bias, 1, conv.padding, groups=conv.members)
        y.float().relu().sum().backward()

    if compiled:
        return torch.compile(im2col), torch.compile(direct)
    return im2col, direct


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--compiled", action="store_true", help="time both paths inside torch.compile")
    p.add_argument("--no-input-grad", action="store_true", help="the input does not require a gradient")
    p.add_argument("--cases", default=None, help="comma-separated COUT:N:MEMBERS (default: the four built in)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "auto"),
                   help="fp32, bf16 (autocast, as runs with precision bf16 take it) or auto (the run's choice: "
                        "bf16 only where the CPU runs it natively)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    runtime = resolve_runtime("cpu", args.precision, threads=args.threads)
    print(describe_machine(runtime), flush=True)
    cases = CASES if args.cases is None else tuple(tuple(int(v) for v in c.split(":")) for c in args.cases.split(","))
    mode = "compiled" if args.compiled else "eager"
    rows = []
    for cout, n, members in cases:
        conv = Conv2d(1, cout, 3, padding=3, members=members)
        conv.reset_parameters(torch.Generator().manual_seed(0))
        x = torch.randn(n, members, 28, 28, generator=torch.Generator().manual_seed(1))
        x.requires_grad_(not args.no_input_grad)
        im2col, direct = passes(conv, x, args.compiled, runtime.precision)
        label = f"{mode} {runtime.precision} 1->{cout} x{members}, {n} images"
        contenders = {"tinyset": ("im2col matrix product", im2col), "direct": ("F.conv2d (oneDNN)", direct)}
        rec = race_report(label, contenders, args.reps, "pass", runtime.threads, runtime.precision,
                          {"cout": cout, "images": n, "members": members, "mode": mode,
                           "input_grad": not args.no_input_grad})
        rows.append(rec)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": describe_machine(runtime), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
