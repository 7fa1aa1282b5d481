"""Shared test set-up: CPU only, quiet TensorFlow, offline data location, small fixtures."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
#: The offline CIFAR-10 archive beside the checkout (see ../shared/data/README.md).
CIFAR10_ARCHIVE = pathlib.Path(
    os.environ.get("TFQKD_CIFAR10_ARCHIVE", REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz")
)

requires_cifar10 = pytest.mark.skipif(
    not CIFAR10_ARCHIVE.exists(),
    reason=f"offline CIFAR-10 archive not found at {CIFAR10_ARCHIVE} (see ../shared/data/README.md)",
)


@pytest.fixture(scope="session")
def cifar10_archive():
    if not CIFAR10_ARCHIVE.exists():
        pytest.skip(f"offline CIFAR-10 archive not found at {CIFAR10_ARCHIVE}")
    return CIFAR10_ARCHIVE
