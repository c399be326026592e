"""CIFAR-10 through ``torchvision.datasets.CIFAR10``, with the original project's transforms.

Expected layout (see data/README.md)::

    <DATASET.ROOT>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}

When the files are missing and ``DATASET.DOWNLOAD`` is true the archive is downloaded into ``DATASET.ROOT``;
a failed download (no network, a proxy, a full disk) becomes a ``FileNotFoundError`` that says how to put the
files there by hand.
"""
from __future__ import annotations

import logging
import os

import torchvision
from torch.utils.data import Dataset
from torchvision import transforms as T
from yacs.config import CfgNode as CN

from .common import README_HINT, describe_path, missing_files, resolve_root

logger = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
BASE_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"


def cifar10_transform(train: bool, augment: bool) -> T.Compose:
    """The original transforms: optional random crop (padding 4) and flip in training, then normalisation.

    Args:
        train: transforms for the training split.
        augment: add RandomCrop(32, padding=4) and RandomHorizontalFlip (training only).

    Returns:
        A transform from a 32x32 PIL image to a normalised (3, 32, 32) float32 tensor.
    """
    steps = []
    if train and augment:
        steps += [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    steps += [T.ToTensor(), T.Normalize(mean=CIFAR10_MEAN, std=CIFAR10_STD)]
    return T.Compose(steps)


def _not_found(root: str, missing: list, download_error: str = "") -> FileNotFoundError:
    folder = os.path.join(root, BASE_FOLDER)
    tried = f" The download failed: {download_error}." if download_error else ""
    return FileNotFoundError(
        f"CIFAR-10 not found under {describe_path(root)}: expected {folder}/ to hold data_batch_1..5, "
        f"test_batch and batches.meta; missing: {', '.join(missing)}.{tried} Download it on a machine with "
        f"network access (set DATASET.DOWNLOAD True) or copy the extracted {BASE_FOLDER} folder there. "
        f"{README_HINT}"
    )


def build_cifar10(cfg: CN, train: bool) -> Dataset:
    """Builds the CIFAR-10 training or test split.

    Args:
        cfg: configuration; reads DATASET.ROOT, DATA_DIR, DATASET.DOWNLOAD and DATASET.AUGMENT.
        train: the 50000-image training split, else the 10000-image test split.

    Returns:
        A dataset of ``(image (3, 32, 32) float32, int label)``.

    Raises:
        FileNotFoundError: the files are missing and could not be downloaded.
        ValueError: the files exist but are corrupt.
    """
    root = resolve_root(cfg) or "."
    folder = os.path.join(root, BASE_FOLDER)
    needed = (TRAIN_FILES if train else TEST_FILES) + (META_FILE,)
    missing = missing_files(folder, needed)
    if missing:
        if not cfg.DATASET.DOWNLOAD:
            raise _not_found(root, missing)
        logger.info("CIFAR-10 files missing under %s (%s); downloading", folder, ", ".join(missing))
        try:
            os.makedirs(root, exist_ok=True)
            torchvision.datasets.CIFAR10(root, train=train, download=True)
        except Exception as exc:  # any network, disk or checksum failure of the download
            raise _not_found(root, missing, f"{type(exc).__name__}: {exc}") from exc
    transform = cifar10_transform(train, bool(cfg.DATASET.AUGMENT))
    try:
        dataset = torchvision.datasets.CIFAR10(root, train=train, transform=transform, download=False)
    except RuntimeError as exc:  # torchvision's checksum test failed
        raise ValueError(
            f"CIFAR-10 files under {folder} are corrupt or incomplete ({exc}). Delete the folder and download "
            f"it again (DATASET.DOWNLOAD True), or copy an intact extracted {BASE_FOLDER} folder there."
        ) from exc
    except Exception as exc:  # unreadable pickle files
        raise ValueError(
            f"cannot read the CIFAR-10 files under {folder}: {type(exc).__name__}: {exc}. Delete the folder and "
            f"download it again, or copy an intact extracted {BASE_FOLDER} folder there."
        ) from exc
    logger.info("CIFAR-10 %s split: %d images from %s", "train" if train else "test", len(dataset), folder)
    return dataset
