"""Helpers shared by every dataset: dataset names, root resolution and errors that say how to fix them.

Every dataset module reports a problem on disk as a ``FileNotFoundError`` (something is missing) or a
``ValueError`` (something is there but unusable). The messages name the path, what was expected there and how
to fix it, so that a user never has to read a traceback from deep inside torchvision.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List

from yacs.config import CfgNode as CN

# canonical names of the supported datasets, and the spellings that map onto them
CLS_DATASETS = ("cifar10", "imagenet", "fashion_mnist")
SEG_DATASETS = ("cityscapes",)
_ALIASES: Dict[str, str] = {
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "imagenet": "imagenet",
    "fashion_mnist": "fashion_mnist",
    "fashion-mnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
    "cityscapes": "cityscapes",
}

README_HINT = "See data/README.md for the expected layout of every dataset."

#: Image channels of the datasets whose images are not RGB (every other dataset has 3).
NON_RGB_CHANNELS: Dict[str, int] = {"fashion_mnist": 1}


def image_channels(name: str) -> int:
    """Image channels of the dataset named ``name`` (as written in DATASET.DATASET, any spelling); 3 unless
    :data:`NON_RGB_CHANNELS` lists it."""
    canonical = _ALIASES.get(str(name).lower().replace("-", "_"), _ALIASES.get(str(name).lower()))
    return NON_RGB_CHANNELS.get(canonical or "", 3)


def dataset_channels(cfg: CN) -> int:
    """Channels of the images the configured dataset delivers: :func:`image_channels`, or 3 where
    DATASET.GRAY_TO_RGB turns a gray dataset into RGB."""
    if cfg.DATASET.get("GRAY_TO_RGB", False):
        return 3
    return image_channels(cfg.DATASET.DATASET)


class BadFileError(ValueError):
    """An image or label file exists but cannot be decoded; the message names the file."""

    def __init__(self, path: str, reason: str = "") -> None:
        self.path = path
        if not reason and "\n" in path:
            # rebuilt from a finished message (a DataLoader worker hands errors back as text): keep it as it is
            super().__init__(path)
            return
        detail = f" ({reason})" if reason else ""
        super().__init__(
            f"cannot read {path}{detail}. Replace or delete the file, or set DATASET.SKIP_BAD_FILES True to skip "
            f"unreadable files with a warning."
        )


def canonical_name(name: str, valid: Iterable[str]) -> str:
    """Maps a dataset name as written in a config file onto its canonical spelling.

    Args:
        name: the value of ``DATASET.DATASET`` (any case; ``-`` and ``_`` variants are accepted).
        valid: the canonical names the caller supports.

    Returns:
        The canonical name, e.g. ``"fashion_mnist"`` for ``"Fashion-MNIST"``.

    Raises:
        ValueError: the name is not one of ``valid``; the message lists the valid names.
    """
    valid = tuple(valid)
    key = str(name).strip().lower()
    canonical = _ALIASES.get(key, key)
    if canonical not in valid:
        raise ValueError(
            f"unknown dataset {name!r} in DATASET.DATASET; valid names are {', '.join(valid)}"
        )
    return canonical


def resolve_root(cfg: CN) -> str:
    """Returns the dataset folder named by the configuration.

    ``DATASET.ROOT`` is used as written when it is absolute or when ``DATA_DIR`` is empty; a relative root is
    joined behind a non-empty ``DATA_DIR`` (the original ``--dataDir`` option).

    Args:
        cfg: a configuration with ``DATA_DIR`` and ``DATASET.ROOT``.

    Returns:
        The dataset folder (not checked for existence).
    """
    root = str(cfg.DATASET.ROOT)
    data_dir = str(cfg.DATA_DIR)
    if root and os.path.isabs(root):
        return root
    if data_dir:
        return os.path.join(data_dir, root) if root else data_dir
    return root


def describe_path(path: str) -> str:
    """A short phrase saying whether path exists, e.g. ``"data/x (the folder does not exist)"``."""
    if not path:
        return "'' (DATASET.ROOT is empty)"
    if not os.path.exists(path):
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(parent):
            return f"{path} (it does not exist)"
        return f"{path} (it does not exist, nor does its parent folder {parent})"
    if os.path.isdir(path):
        return f"{path} (the folder exists)"
    return f"{path} (a file, not a folder)"


def missing_files(folder: str, names: Iterable[str]) -> List[str]:
    """Returns the entries of names that are not files inside folder."""
    return [n for n in names if not os.path.isfile(os.path.join(folder, n))]
