"""Model zoo: ``create_model(name, channels, num_classes, image_size)``, timm-style.

Registered names (case-insensitive, ``_`` = ``-``): the ConvNet family (``convnet``,
``convnet-bn/-ln/-gn/-nn``, ``convnet-d1``..``-d5``, ``convnet-w32/-w64/-w128/-w256``,
``convnet-mp/-np``, ``convnet-as/-ar/-al/-aswish``, ``convnet-frepo``), ``mlp``, ``lenet``, ``alexnet``,
``alexnet-bn``, ``vgg11``, ``vgg11-bn``, ``resnet18``, ``resnet18-bn``.
Every model has ``embed(x)`` and ``classifier``, and can be built ``members`` wide (an ensemble
of independent networks evaluated in one pass, see :mod:`tinyset.models.layers`).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import torch

from tinyset.models.alexnet import AlexNet
from tinyset.models.base import TinyNet
from tinyset.models.convnet import ConvNet
from tinyset.models.layers import init_parameters
from tinyset.models.lenet import LeNet
from tinyset.models.mlp import MLP
from tinyset.models.resnet import ResNet
from tinyset.models.vgg import VGG
from tinyset.registry import Registry
from tinyset.rng import make_generator

MODELS: Registry = Registry("model")

MODELS.register("convnet", partial(ConvNet), help="ConvNet-3, width 128, InstanceNorm, ReLU, avgpool")
for _norm, _suffix in (("batchnorm", "bn"), ("layernorm", "ln"), ("groupnorm", "gn"), ("none", "nn")):
    MODELS.register(f"convnet-{_suffix}", partial(ConvNet, norm=_norm), help=f"ConvNet with {_norm}")
for _d in range(1, 6):
    MODELS.register(f"convnet-d{_d}", partial(ConvNet, depth=_d), help=f"ConvNet of depth {_d}")
for _w in (32, 64, 128, 256):
    MODELS.register(f"convnet-w{_w}", partial(ConvNet, width=_w), help=f"ConvNet of width {_w}")
MODELS.register("convnet-frepo", partial(ConvNet, norm="none", widen=2),
                help="FRePo's Conv network: ConvNet-3 without normalisation, widths 128/256/512 (doubling per block)")
MODELS.register("convnet-mp", partial(ConvNet, pooling="maxpooling"), help="ConvNet with max pooling")
MODELS.register("convnet-np", partial(ConvNet, pooling="none"), help="ConvNet without pooling")
for _act, _suffix in (("sigmoid", "as"), ("relu", "ar"), ("leakyrelu", "al"), ("swish", "aswish")):
    MODELS.register(f"convnet-{_suffix}", partial(ConvNet, act=_act), help=f"ConvNet with {_act}")
MODELS.register("mlp", partial(MLP), help="MLP 128-128, ReLU")
MODELS.register("lenet", partial(LeNet), help="LeNet-5")
MODELS.register("alexnet", partial(AlexNet), help="CIFAR-sized AlexNet")
MODELS.register("alexnet-bn", partial(AlexNet, norm="batchnorm"), help="AlexNet with BatchNorm")
MODELS.register("vgg11", partial(VGG), help="VGG11 with InstanceNorm")
MODELS.register("vgg11-bn", partial(VGG, norm="batchnorm"), help="VGG11 with BatchNorm")
MODELS.register("resnet18", partial(ResNet), help="ResNet18 with InstanceNorm")
MODELS.register("resnet18-bn", partial(ResNet, norm="batchnorm"), help="ResNet18 with BatchNorm")


def create_model(name: str, channels: int, num_classes: int, image_size: Sequence[int] | int,
                 members: int = 1, generator: torch.Generator | None = None, seed: int | None = None,
                 device: str | torch.device = "cpu", **kwargs: Any) -> TinyNet:
    """Build a freshly initialised network (or ``members`` independent ones in one module).

    Initialisation draws from ``generator`` (or a generator seeded with ``seed``, default 0), never
    from the global RNG: the same seed gives the same weights.
    """
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if members < 1:
        raise ValueError(f"members must be >= 1, got {members}")
    ctor = MODELS.get(name)
    key = MODELS._key(name)
    model: TinyNet = ctor(channels=channels, num_classes=num_classes, image_size=tuple(image_size),
                          members=members, name=key, **kwargs)
    if generator is None:
        generator = make_generator(0 if seed is None else seed)
    init_parameters(model, generator)
    return model.to(device)


def _member_slices(ens: TinyNet, single: TinyNet, m: int):
    ens_state = ens.state_dict()
    for key, value in single.state_dict().items():
        big = ens_state[key]
        if big.dim() == 0:
            yield key, big, big
            continue
        n = value.shape[0]
        if big.shape[0] != n * ens.members:
            raise RuntimeError(f"cannot split {key}: {tuple(big.shape)} vs {tuple(value.shape)}")
        yield key, big, slice(m * n, (m + 1) * n)


def extract_member(ens: TinyNet, m: int) -> TinyNet:
    """Member ``m`` of an ensemble as an ordinary one-member network (weights copied)."""
    spec = ens.spec()
    name = spec.pop("name")
    single = create_model(name, members=1, **spec).to(next(ens.parameters()).device)
    state = {}
    for key, big, sl in _member_slices(ens, single, m):
        state[key] = big if isinstance(sl, torch.Tensor) else big[sl].clone()
    single.load_state_dict(state)
    return single


def stack_members(models: Sequence[TinyNet]) -> TinyNet:
    """Several identical-architecture networks as one ensemble (weights copied)."""
    spec = models[0].spec()
    name = spec.pop("name")
    ens = create_model(name, members=len(models), **spec).to(next(models[0].parameters()).device)
    state = {}
    for key in models[0].state_dict():
        parts = [mdl.state_dict()[key] for mdl in models]
        state[key] = parts[0].clone() if parts[0].dim() == 0 else torch.cat(parts, 0)
    ens.load_state_dict(state)
    return ens


__all__ = ["MODELS", "TinyNet", "create_model", "extract_member", "stack_members", "ConvNet", "MLP",
           "LeNet", "AlexNet", "VGG", "ResNet"]
