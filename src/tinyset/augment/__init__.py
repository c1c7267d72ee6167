"""Augmentation: Differentiable Siamese Augmentation (DSA) and the DC paper's evaluation augmentation.

:data:`AUGMENTATIONS` maps an evaluation protocol's ``augment`` value to a builder
``build(protocol, dataset, has_batchnorm) -> augmenter or None``: ``dsa``
(:class:`~tinyset.augment.dsa.DSA` with the protocol's ``dsa_strategy`` or the dataset's default),
``dc`` (:class:`~tinyset.augment.dc.DCAugment` with the protocol's ``dc_strategy`` or the DC
paper's rule, :func:`~tinyset.augment.dc.dc_rule`) and ``none``. ``has_batchnorm`` is a callable
(the evaluated architecture is only built when a rule needs to know).
"""
from __future__ import annotations

from typing import Any, Callable

from tinyset.augment.dc import DC_OPS, DCAugment, DCAugParams, dc_rule, parse_dc_strategy
from tinyset.augment.dsa import DEFAULT_STRATEGY, DSA, OPS, AugParams, DSAParams, parse_strategy
from tinyset.errors import ConfigError
from tinyset.registry import Registry


def default_strategy(dataset: str) -> str:
    """The literature's strategy: no flips for digit datasets (MNIST, SVHN, digits)."""
    if dataset.lower().replace("_", "-") in ("mnist", "svhn", "digits"):
        return "color_crop_cutout_scale_rotate"
    return DEFAULT_STRATEGY


#: protocol ``augment`` value -> ``build(protocol, dataset, has_batchnorm)`` (an augmenter or None)
AUGMENTATIONS: Registry[Callable[[Any, str, Callable[[], bool]], Any]] = Registry("augmentation")


@AUGMENTATIONS.register("dsa", help="DSA (Zhao & Bilen 2021): the protocol's dsa_strategy or the dataset's default")
def _build_dsa(protocol: Any, dataset: str, has_batchnorm: Callable[[], bool]) -> DSA:
    return DSA(getattr(protocol, "dsa_strategy", None) or default_strategy(dataset))


@AUGMENTATIONS.register("dc", help="the DC paper's evaluation augmentation: the protocol's dc_strategy or "
                                   "its rule (crop_noise for BatchNorm networks, crop_scale_rotate for MNIST)")
def _build_dc(protocol: Any, dataset: str, has_batchnorm: Callable[[], bool]) -> DCAugment:
    strategy = getattr(protocol, "dc_strategy", None)
    if strategy is None:
        strategy = dc_rule(dataset, has_batchnorm())
        if strategy == "none":
            raise ConfigError(f"protocol {getattr(protocol, 'name', '?')!r}: the DC paper's rule gives no augmentation "
                              f"for {dataset} with a network without BatchNorm (it augments MNIST and BatchNorm "
                              f"networks only) and then trains 300 epochs: use --protocol noaug for that setting, "
                              f"or set dc_strategy (e.g. crop_scale_rotate)")
    return DCAugment(strategy)


@AUGMENTATIONS.register("none", help="no augmentation")
def _build_none(protocol: Any, dataset: str, has_batchnorm: Callable[[], bool]) -> None:
    return None


__all__ = ["DSA", "AugParams", "DSAParams", "OPS", "DEFAULT_STRATEGY", "parse_strategy", "default_strategy",
           "DCAugment", "DCAugParams", "DC_OPS", "parse_dc_strategy", "dc_rule", "AUGMENTATIONS"]
