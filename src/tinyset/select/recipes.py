"""Named selection pipelines (``tinyset select --recipe NAME``): a selector plus option values, as data.

The issue #11 source report (``../shared/sources/000_d734e3bc7a4cda81.txt``) names its pipelines
MPS1, MPS1 with GAN, MPS2, MPS2U and "Mutual Info". It describes what each adds but publishes no
settings (no pool sizes, epochs, patience or learning rates), so every recipe below is the report's
*structure* built from tinyset's pieces, with tinyset's own values where the report is silent; each
row says which part comes from the report and which is ours. A recipe's rows form a
:class:`tinyset.hparams.Table` applied as one layer of :func:`tinyset.select.resolve_options`
(after the option defaults, before ``--config`` and ``--set``), so a run records every value with
the recipe row it came from.

``mps1-gan`` (MPS1 with a GAN improving the selected set) is not a selection recipe: its output is
generated images. It is ``--recipe mps1`` followed by ``tinyset distill --method gan --init
file:SELECTION --set refine=project`` (the generator's projection of every selected image, see
:mod:`tinyset.methods.gan`); the README's recipe table lists both commands.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from tinyset.hparams import Row, Table
from tinyset.registry import Registry

#: where the pipelines are described
REPORT = "issue #11 source report (shared/sources/000_d734e3bc7a4cda81.txt)"


@dataclass(frozen=True)
class Recipe:
    """A named pipeline: the ``selector`` it runs, ``rows`` of option values (each with its source,
    optionally for some datasets only; later rows override earlier ones) and a one-line ``summary``
    (the README table and ``tinyset select --list-recipes``)."""

    selector: str
    summary: str
    rows: tuple[Row, ...]

    def table(self, name: str) -> Table:
        """The rows as a :class:`~tinyset.hparams.Table`, every source prefixed with the recipe's name."""
        return Table(tuple(Row(r.values, f"recipe {name}: {r.source}", r.datasets, r.ipcs) for r in self.rows))

    def values(self, dataset: str, ipc: int) -> dict[str, Any]:
        """The option values the recipe sets for ``(dataset, ipc)`` (later rows win)."""
        out: dict[str, Any] = {}
        for r in self.rows:
            if r.matches(dataset, ipc):
                out.update(r.values)
        return out


RECIPES: Registry = Registry("recipe")


def _row(values: Mapping[str, Any], source: str, datasets: tuple[str, ...] | None = None) -> Row:
    return Row(dict(values), source, datasets)


#: MPS1: a ConvNet and an RL agent that selects representative real samples
_MPS1 = (
    _row({"model": "convnet-w32", "pool": "random", "init": "zero", "patience": 0, "train_patience": 0},
         f"{REPORT}, Methodology iii: MPS1 = a ConvNet trained on the set, an RL agent choosing the samples; "
         f"no settings published: width 32 (a 2-core CPU budget), random pool, uniform initial policy, no "
         f"early stopping are ours"),
)
#: MPS2: MPS1 plus early stopping (to prevent overfitting and save time)
_MPS2 = _MPS1 + (
    _row({"patience": 8, "train_patience": 4},
         f"{REPORT}, Methodology iii: MPS2 adds early stopping; its rule is not published: the policy stops "
         f"after 8 iterations without a better validation reward and every reward network after 4 epochs "
         f"without a better validation accuracy (ours)"),
)
#: MPS2U: MPS2 with per-dataset epoch budgets (fewer for MNIST/FashionMNIST, more for CIFAR)
_MPS2U = _MPS2 + (
    _row({"epochs": 6, "iterations": 20},
         f"{REPORT}, Methodology iii: MPS2U gives MNIST and FashionMNIST fewer epochs (counts not "
         f"published: 6 epochs per reward network, 20 policy iterations are ours)",
         ("mnist", "fashion-mnist", "digits")),
    _row({"epochs": 20, "iterations": 40},
         f"{REPORT}, Methodology iii: MPS2U gives CIFAR-10/100 more epochs (counts not published: 20 "
         f"epochs, 40 policy iterations are ours)", ("cifar10", "cifar100", "svhn")),
)
#: Mutual Info: MPS2U with the pool restricted to the top samples by mutual information
_MUTUAL_INFO = _MPS2U + (
    _row({"pool": "mi", "pool_size": 100, "init": "mi"},
         f"{REPORT}, Methodology iii and Implementation: the top 1,000 samples by mutual information (100 per "
         f"class of a 10-class dataset), then the RL agent, built on MPS2U; the policy starts from the "
         f"standardised MI scores (ours)"),
)


def _register(name: str, summary: str, rows: tuple[Row, ...]) -> None:
    RECIPES.register(name, Recipe("rl", summary, rows), help=summary)


_register("mps1", "RL-driven selection rewarded by a ConvNet's validation accuracy", _MPS1)
_register("mps2", "mps1 + early stopping (of the policy on its validation reward and of every reward network)",
          _MPS2)
_register("mps2u", "mps2 with per-dataset epoch budgets (fewer on MNIST/FashionMNIST, more on CIFAR)", _MPS2U)
_register("mutual-info", "mps2u choosing from the top 1,000 samples by mutual information (100 per class), "
                         "policy initialised from the MI scores", _MUTUAL_INFO)


#: the report's pipelines that are not selections, with the commands that build them (``--list-recipes``)
ELSEWHERE = {
    "mps1-gan": "not a selection (generated images): `tinyset select --recipe mps1 ... --out SEL.safetensors`, then "
                "`tinyset distill --method gan ... --init file:SEL.safetensors --set refine=project`",
}

__all__ = ["Recipe", "RECIPES", "REPORT", "ELSEWHERE"]
