"""Which expert segments can an MTT student match? The initial matching loss per start epoch.

Before any image is learned (real initialisation), the student is unrolled ``syn_steps`` SGD steps
from an expert's epoch-t parameters at a fixed lr, and the normalised distance to the expert's epoch
t+M is measured (the MTT loss, ``tinyset.methods.mtt.unroll_loss``, no update). A value below 1 means
the student already moves towards the expert's target; above 1 it overshoots or moves elsewhere, and
learning images then chases segments it cannot match. Only the training split and the expert set are
read (no validation or test data), so the table may guide a preset's ``max_start_epoch``,
``expert_epochs``, ``syn_steps`` and ``lr_teacher``; how the resulting set performs must still be
judged by validation accuracy.

    python benchmarks/probe_mtt_start.py --dataset mnist --experts runs/experts_mnist --ipc 1 \\
        --data-root ../shared/datasets --lrs 0.001,0.003,0.01 --syn-steps 10,20 --expert-epochs 1,2

Prints one row per (expert_epochs, syn_steps, lr): the mean loss over ``--draws`` draws (expert,
real-image batches, DSA) for each start epoch.
"""
from __future__ import annotations

import argparse
import itertools
import sys

import torch


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> int:
    from tinyset.augment import DSA, default_strategy
    from tinyset.data import load_dataset
    from tinyset.data.base import RealPool
    from tinyset.experts import ExpertSet
    from tinyset.methods import METHODS
    from tinyset.methods.base import DistillContext
    from tinyset.methods.loop import resolve_config
    from tinyset.rng import make_generator
    from tinyset.runtime import describe_machine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--experts", required=True, help="expert set folder (tinyset experts --out)")
    ap.add_argument("--ipc", type=int, default=1)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--lrs", default="0.001,0.003,0.01", help="student lrs (lr_teacher), comma-separated")
    ap.add_argument("--syn-steps", default="10,20")
    ap.add_argument("--expert-epochs", default="1,2")
    ap.add_argument("--starts", default="", help="start epochs (default: every one the experts allow)")
    ap.add_argument("--draws", type=int, default=4, help="draws per start epoch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    print(describe_machine(), flush=True)
    train = load_dataset(args.dataset, split="train", root=args.data_root)
    expert_set = ExpertSet(args.experts)
    epochs = expert_set.epochs
    device = torch.device("cpu")
    pool = RealPool(train, device)  # read once; every setting below draws from it
    augment = DSA(default_strategy(train.info.name))
    for ee, ss, lr in itertools.product(_ints(args.expert_epochs), _ints(args.syn_steps), _floats(args.lrs)):
        starts = _ints(args.starts) or list(range(epochs - ee + 1))
        starts = [t for t in starts if t + ee <= epochs]
        # recompute: the only unroll that runs without autograd (the probe needs no gradients)
        sets = {"experts": args.experts, "model": expert_set.model, "memory": "recompute", "compile": "off",
                "init": "real",
                "lr_teacher": lr, "expert_epochs": ee, "syn_steps": ss, "max_start_epoch": max(starts) + 1}
        cfg = resolve_config("mtt", train.info.name, args.ipc, "cpu", sets=sets).values
        gen = make_generator(args.seed)
        ctx = DistillContext(train.info, pool, args.ipc, device, "fp32", augment)
        impl = METHODS.get("mtt")(cfg, ctx)
        impl.setup(gen)
        row = []
        for t in starts:
            def draw(g, t=t):
                return impl.pool_ids[int(torch.randint(len(impl.pool_ids), (1,), generator=g))], t
            impl.draw = draw
            with torch.no_grad():
                losses = [float(impl.matching_loss(gen)) for _ in range(args.draws)]
            row.append(f"t={t}: {sum(losses) / len(losses):.3f}")
        print(f"expert_epochs {ee}, syn_steps {ss}, lr {lr:g} | " + "  ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
