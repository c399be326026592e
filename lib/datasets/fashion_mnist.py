"""Fashion-MNIST from its IDX files, held in memory as one uint8 tensor, with tensor-op transforms.

The files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each plain or ``.gz``) are searched in this order:

1. ``DATASET.ROOT`` itself, then ``DATASET.ROOT/FashionMNIST/raw`` (torchvision's layout);
2. ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package);
3. a download through ``torchvision.datasets.FashionMNIST`` into ``DATASET.ROOT`` when DATASET.DOWNLOAD is
   true.

Every transform is a cheap tensor operation in ``__getitem__`` (no PIL), so that training on a couple of CPU
cores is not limited by data loading; ``get_batch`` transforms a whole batch in a few vectorised operations.
"""
from __future__ import annotations

import gzip
import logging
import os
import zlib
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from yacs.config import CfgNode as CN

from .common import README_HINT, describe_path, resolve_root

logger = logging.getLogger(__name__)

FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist package puts the files
PAD = 2  # zero padding of the random crop, in pixels
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_PREFIX = {True: "train", False: "t10k"}


def read_idx(path: str, expected_magic: int) -> np.ndarray:
    """Reads an IDX file of unsigned bytes (plain, or gzip when the name ends in ``.gz``).

    Args:
        path: the file.
        expected_magic: 0x00000803 for an image file (N, H, W), 0x00000801 for a label file (N,).

    Returns:
        A read-only uint8 array with the dimensions of the header.

    Raises:
        ValueError: bad magic number, truncated or oversized payload, or a corrupt gzip stream; the message
            names the file.
    """
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            with open(path, "rb") as fh:
                raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"cannot read IDX file {path}: {type(exc).__name__}: {exc}. The file is corrupt or "
                         f"truncated; download it again.") from exc
    if len(raw) < 4:
        raise ValueError(f"IDX file {path} is truncated ({len(raw)} bytes, no header); download it again.")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"IDX file {path} has magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"({'images' if expected_magic == IDX_IMAGES_MAGIC else 'labels'}, unsigned bytes). It is not a "
            f"Fashion-MNIST {'image' if expected_magic == IDX_IMAGES_MAGIC else 'label'} file, or it is corrupt."
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path} is truncated inside its header; download it again.")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise ValueError(
            f"IDX file {path} holds {len(raw)} bytes, but its header {tuple(dims)} needs {expected}: the file is "
            f"{'truncated' if len(raw) < expected else 'too long'}; download it again."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _split_file(folder: str, stem: str) -> Optional[str]:
    for name in (stem, stem + ".gz"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def find_split_files(folders: Sequence[str], train: bool) -> Optional[Tuple[str, str]]:
    """Finds the (images, labels) files of a split in the first folder that holds both.

    Args:
        folders: folders to search, in order.
        train: the ``train-*`` files, else the ``t10k-*`` files.

    Returns:
        (images path, labels path), or None when no folder holds both.
    """
    prefix = _PREFIX[train]
    for folder in folders:
        if not folder:
            continue
        images = _split_file(folder, f"{prefix}-images-idx3-ubyte")
        labels = _split_file(folder, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            return images, labels
    return None


def load_split(images_path: str, labels_path: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reads and validates a pair of IDX files.

    Returns:
        images (N, H, W) uint8 and labels (N,) int64.

    Raises:
        ValueError: corrupt files, counts that disagree, or labels outside 0..9.
    """
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
                         f"{labels.shape[0]} labels; the files do not belong together.")
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise ValueError(f"{labels_path} holds label {int(labels.max())}; Fashion-MNIST labels are 0..9.")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class FashionMNIST(Dataset):
    """A Fashion-MNIST split held in memory.

    Args:
        images: (N, H, W) uint8.
        labels: (N,) int64.
        augment: random crop with ``PAD`` pixels of black padding and random horizontal flip.
        pad_to: 0 keeps the images as they are; S >= H, W puts each image in the middle of a black S x S square
            (32 gives CIFAR's size; the extra row and column of an odd difference go to the bottom and right).
        rgb: repeat the gray channel three times, for models built for RGB input.

    Items are ``(image (C, S, S) float32, int label)`` with C = 3 when ``rgb`` else 1 and S the padded side,
    normalised with mean 0.2860 and std 0.3530. Random numbers come from torch's global generator (seeded per
    worker by the DataLoader).
    """

    classes = CLASSES

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool = False, pad_to: int = 0,
                 rgb: bool = False) -> None:
        if images.dtype != torch.uint8 or images.dim() != 3:
            raise ValueError(f"images must be an (N, H, W) uint8 tensor, got {tuple(images.shape)} {images.dtype}")
        if pad_to:
            h, w = images.shape[1:]
            if pad_to < max(h, w):
                raise ValueError(f"DATASET.PAD_TO {pad_to} is smaller than the {h}x{w} images; use 0 (no padding) "
                                 f"or a side of at least {max(h, w)}")
            top, left = (pad_to - h) // 2, (pad_to - w) // 2
            images = F.pad(images, (left, pad_to - w - left, top, pad_to - h - top))  # black border, once
        self.data = images.contiguous()  # (N, S, S) uint8
        self.targets = labels.long()  # (N,)
        self.augment = augment
        self.channels = 3 if rgb else 1

    def __len__(self) -> int:
        return self.data.shape[0]

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (..., H, W) -> normalised float32 (..., C, H, W), the channel inserted at dimension -3."""
        x = x.float().div_(255.0).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD).unsqueeze(-3)
        if self.channels > 1:
            x = x.repeat_interleave(self.channels, dim=-3)
        return x

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        image = self.data[index]  # (H, W) uint8
        if self.augment:
            h, w = image.shape
            padded = F.pad(image, (PAD, PAD, PAD, PAD))  # (H + 2P, W + 2P), black border
            oy, ox = torch.randint(0, 2 * PAD + 1, (2,)).tolist()
            image = padded[oy: oy + h, ox: ox + w]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return self._normalize(image), int(self.targets[index])  # (C, H, W)

    def get_batch(self, indices: Union[Sequence[int], torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Transforms a whole batch at once (the same distribution as ``__getitem__``, one sample at a time).

        Args:
            indices: B sample indices.

        Returns:
            images (B, C, H, W) float32 and labels (B,) int64.
        """
        idx = torch.as_tensor(indices, dtype=torch.long)
        images = self.data[idx]  # (B, H, W) uint8
        if self.augment and idx.numel():
            b, h, w = images.shape
            padded = F.pad(images, (PAD, PAD, PAD, PAD))  # (B, H + 2P, W + 2P)
            oy = torch.randint(0, 2 * PAD + 1, (b, 1))
            ox = torch.randint(0, 2 * PAD + 1, (b, 1))
            flip = torch.rand(b, 1) < 0.5
            rows = oy + torch.arange(h)  # (B, H)
            cols = torch.where(flip, ox + torch.arange(w - 1, -1, -1), ox + torch.arange(w))  # (B, W)
            images = padded[torch.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, H, W)
        return self._normalize(images), self.targets[idx]  # (B, C, H, W), (B,)


def _download(root: str, train: bool) -> Tuple[str, str]:
    import torchvision

    os.makedirs(root, exist_ok=True)
    torchvision.datasets.FashionMNIST(root, train=train, download=True)
    found = find_split_files([os.path.join(root, "FashionMNIST", "raw")], train)
    if found is None:
        raise FileNotFoundError("the download finished but the IDX files are not where torchvision puts them")
    return found


def build_fashion_mnist(cfg: CN, train: bool) -> FashionMNIST:
    """Builds the Fashion-MNIST training (60000 images) or test (10000 images) split.

    Args:
        cfg: configuration; reads DATASET.ROOT, DATA_DIR, DATASET.DOWNLOAD, DATASET.AUGMENT, DATASET.PAD_TO and
            DATASET.GRAY_TO_RGB.
        train: the training split (augmented when DATASET.AUGMENT), else the test split.

    Returns:
        A FashionMNIST dataset of ``(image (1, 28, 28) float32, int label)``; ``(3, 32, 32)`` with
        ``DATASET.PAD_TO 32 DATASET.GRAY_TO_RGB True`` (the shape of the CIFAR-10 yamls' input).

    Raises:
        FileNotFoundError: the files are nowhere to be found and could not be downloaded.
        ValueError: a file is corrupt (the message names it).
    """
    root = resolve_root(cfg)
    searched: List[str] = []
    if root:
        searched += [root, os.path.join(root, "FashionMNIST", "raw")]
    searched.append(SYSTEM_DIR)
    found = find_split_files(searched, train)
    prefix = _PREFIX[train]
    if found is None:
        names = f"{prefix}-images-idx3-ubyte[.gz] and {prefix}-labels-idx1-ubyte[.gz]"
        hint = (f"Put the files in DATASET.ROOT, install Debian's dataset-fashion-mnist package "
                f"(files in {SYSTEM_DIR}), or set DATASET.DOWNLOAD True on a machine with network access. "
                f"{README_HINT}")
        where = ", ".join(describe_path(f) for f in searched)
        if not cfg.DATASET.DOWNLOAD or not root:
            raise FileNotFoundError(f"Fashion-MNIST not found: expected {names} in one of {where}. {hint}")
        logger.info("Fashion-MNIST not found in %s; downloading into %s", ", ".join(searched), root)
        try:
            found = _download(root, train)
        except Exception as exc:  # any network or disk failure of the download
            raise FileNotFoundError(
                f"Fashion-MNIST not found (expected {names} in one of {where}) and the download into {root} "
                f"failed: {type(exc).__name__}: {exc}. {hint}"
            ) from exc
    images, labels = load_split(*found)
    logger.info("Fashion-MNIST %s split: %d images from %s", prefix, len(labels), os.path.dirname(found[0]))
    return FashionMNIST(images, labels, augment=train and bool(cfg.DATASET.AUGMENT),
                        pad_to=int(cfg.DATASET.PAD_TO), rgb=bool(cfg.DATASET.GRAY_TO_RGB))
