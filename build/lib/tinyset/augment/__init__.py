"""Augmentation: Differentiable Siamese Augmentation (DSA)."""
from tinyset.augment.dsa import DEFAULT_STRATEGY, DSA, OPS, AugParams, DSAParams, parse_strategy


def default_strategy(dataset: str) -> str:
    """The literature's strategy: no flips for digit datasets (MNIST, SVHN, digits)."""
    if dataset.lower().replace("_", "-") in ("mnist", "svhn", "digits"):
        return "color_crop_cutout_scale_rotate"
    return DEFAULT_STRATEGY


__all__ = ["DSA", "AugParams", "DSAParams", "OPS", "DEFAULT_STRATEGY", "parse_strategy", "default_strategy"]
