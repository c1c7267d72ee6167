"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

#: environment variable that overrides where the real datasets are looked for
SHARED_DATASETS_ENV = "TINYSET_SHARED_DATASETS"


def shared_datasets_path() -> Path:
    """``$TINYSET_SHARED_DATASETS``, else ``shared/datasets`` beside the repository root."""
    env = os.environ.get(SHARED_DATASETS_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    """The folder of real datasets (torchvision layout); skips the test when it is missing."""
    path = shared_datasets_path()
    if not path.is_dir():
        pytest.skip(f"real datasets folder {path} not found (set {SHARED_DATASETS_ENV} to its "
                    f"location to run the realdata tests)")
    return path
