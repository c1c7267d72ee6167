"""Moved to :mod:`tinyset.training` (the one network-training loop); re-exported for old imports."""
from tinyset.training import TrainSettings, sgd_step, test_accuracy, train_ensemble

__all__ = ["TrainSettings", "train_ensemble", "test_accuracy", "sgd_step"]
