"""The ``teacher`` label regime: soft labels from a trained network at evaluation time.

Knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
Network"): every image of the evaluated set is labelled once with a teacher network's softmax at
temperature ``T``, ``softmax(z / T)``, and the fresh networks train on those probability rows with
soft cross-entropy (:func:`tinyset.training.train_ensemble` takes ``[N, K]`` labels). The teacher
is one epoch of one expert of a folder made by ``tinyset experts``
(:meth:`tinyset.experts.ExpertSet.load_model`); by default the last epoch of expert 0.

The regime is part of every result because it changes the numbers a lot: a random real subset
labelled by a teacher comes close to distilled images with hard labels (Qin et al. 2024, "A Label
is Worth a Thousand Images in Dataset Distillation"), so results are only compared within one
regime (:func:`tinyset.evaluate.report.comparison_table`).

Whitening: the set's images live in the set's space (ZCA-whitened when the set carries a
transform), the teacher expects its own (whitened when its experts were trained with ``--zca``).
Images are mapped set space -> the dataset's normalised space -> teacher space before labelling,
so any set works with any teacher of the same dataset and normalisation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinyset.data.base import DatasetInfo
from tinyset.data.zca import Zca
from tinyset.errors import ConfigError

#: images labelled per forward pass of the teacher
TEACHER_BATCH = 1000


def parse_teacher(spec: str) -> tuple[Path, int | None]:
    """``"DIR"`` -> ``(DIR, None)``; ``"DIR:EPOCH"`` -> ``(DIR, EPOCH)`` (only a trailing ``:digits``
    is an epoch, so paths with colons still work)."""
    text = str(spec).strip()
    if not text:
        raise ConfigError("--teacher '': empty; expected EXPERTS_DIR or EXPERTS_DIR:EPOCH (a folder made by "
                          "`tinyset experts`)")
    head, sep, tail = text.rpartition(":")
    if sep and head and tail.isdigit():
        return Path(head), int(tail)
    return Path(text), None


@dataclass(eq=False)
class Teacher:
    """A network that labels images with its softmax at ``temperature`` (see the module docstring).

    Attributes:
        net: the teacher (one member, eval mode while labelling).
        info: the dataset (and normalisation) it was trained on.
        zca: the whitening of its inputs, or ``None``.
        temperature: ``T`` of ``softmax(logits / T)``, > 0.
        source: where it comes from (recorded in the result's protocol).
    """

    net: torch.nn.Module
    info: DatasetInfo
    zca: Zca | None = None
    temperature: float = 1.0
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            raise ConfigError(f"teacher temperature must be a finite number > 0, got {t!r}")
        self.temperature = float(t)

    @classmethod
    def from_experts(cls, spec: str | Path, temperature: float = 1.0, device: str | torch.device = "cpu",
                     expert: int = 0) -> "Teacher":
        """Expert ``expert`` of the folder ``spec`` (``DIR`` or ``DIR:EPOCH``; default epoch: the last
        one the experts were trained for, which must be stored)."""
        from tinyset.experts import ExpertSet

        path, epoch = parse_teacher(str(spec))
        experts = ExpertSet(path)
        done = experts.completed_epoch(expert)
        if epoch is None:
            if done < experts.epochs:
                raise ConfigError(f"--teacher {spec}: expert {expert} of {path} has only epochs 0..{done} of "
                                  f"{experts.epochs} stored; finish it (`tinyset experts ... --resume`) or name "
                                  f"a stored epoch as {path}:EPOCH")
            epoch = experts.epochs
        net = experts.load_model(expert, epoch, device)
        net.requires_grad_(False)
        source = {"experts": str(path), "expert": expert, "epoch": epoch, "model": experts.model,
                  "zca": experts.zca}
        return cls(net, experts.info, experts.zca_transform(), temperature, source)

    def describe(self) -> dict[str, Any]:
        return {**self.source, "temperature": self.temperature}

    def check(self, info: DatasetInfo, where: str = "the set") -> None:
        """Refuse a set of another dataset, image shape, class count or normalisation; the message
        names both values."""
        mine, src = self.info, self.source.get("experts", "the teacher")
        if mine.name != info.name:
            raise ConfigError(f"teacher {src} was trained on dataset {mine.name!r}; {where} is of {info.name!r}")
        if (mine.channels, tuple(mine.image_size), mine.num_classes) != (
                info.channels, tuple(info.image_size), info.num_classes):
            raise ConfigError(f"teacher {src} takes {mine.channels}x{mine.image_size[0]}x{mine.image_size[1]} images "
                              f"of {mine.num_classes} classes; {where} has {info.channels}x{info.image_size[0]}x"
                              f"{info.image_size[1]} images of {info.num_classes} classes")
        close = all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
                    for a, b in zip((*mine.mean, *mine.std), (*info.mean, *info.std)))
        if not close or len(mine.mean) != len(info.mean):
            raise ConfigError(f"teacher {src} was trained with normalisation mean {list(mine.mean)} std "
                              f"{list(mine.std)}; {where} uses mean {list(info.mean)} std {list(info.std)}")

    @torch.no_grad()
    def label(self, images: torch.Tensor, zca: Zca | None = None) -> torch.Tensor:
        """Soft labels ``float32 [N, K]`` (rows sum to 1) for ``images`` given in the space of ``zca``
        (the set's whitening, ``None``: the dataset's normalised space), on the images' device."""
        device = images.device
        net = self.net.to(device)
        was_training = net.training
        net.eval()
        rows = []
        try:
            for b0 in range(0, images.shape[0], TEACHER_BATCH):
                x = images[b0:b0 + TEACHER_BATCH].detach().float()
                if zca is not None:
                    x = zca.unwhiten(x)
                if self.zca is not None:
                    x = self.zca.whiten(x)
                logits = net(x).float().reshape(x.shape[0], -1)
                rows.append(torch.softmax(logits / self.temperature, dim=1))
        finally:
            net.train(was_training)
        return torch.cat(rows)


__all__ = ["Teacher", "parse_teacher", "TEACHER_BATCH"]
