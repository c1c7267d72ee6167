"""Datasets: the registry of readers for the standard image datasets, and the in-memory forms.

Importing this package registers ``mnist``, ``fashion-mnist``, ``svhn``, ``cifar10``, ``cifar100``
and ``digits`` in :data:`DATASETS`; ``imagefolder:PATH`` names any folder of class subfolders.
Files are expected where torchvision keeps them under the data root (see each reader module).
:class:`Zca` (:mod:`tinyset.data.zca`) is the optional ZCA whitening, fitted on a training split.
"""
from tinyset.data.base import (DATASET_FAMILIES, DATASETS, DatasetInfo, ImageDataset, RealPool, check_ipc,
                               default_data_root, get_spec, load_dataset, split_validation)
from tinyset.data import cifar, digits, idx, imagefolder, svhn  # noqa: F401  (registers readers)
from tinyset.data.imagefolder import ImageFolderSpec
from tinyset.data.zca import ZCA_EPS, Zca, fit_zca

__all__ = [
    "DatasetInfo", "ImageDataset", "RealPool", "DATASETS", "DATASET_FAMILIES", "load_dataset", "get_spec",
    "default_data_root", "split_validation", "check_ipc", "ImageFolderSpec",
    "Zca", "fit_zca", "ZCA_EPS",
]
