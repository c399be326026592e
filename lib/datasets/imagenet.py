"""ImageNet as a ``torchvision.datasets.ImageFolder``, with the original project's transforms.

Expected layout (see data/README.md)::

    <DATASET.ROOT>/images/<DATASET.TRAIN_SET>/<class folder>/<image>.JPEG
    <DATASET.ROOT>/images/<DATASET.TEST_SET>/<class folder>/<image>.JPEG

The validation split must be sorted into the same class folders as the training split. An image that cannot
be decoded raises a ``BadFileError`` naming it; with ``DATASET.SKIP_BAD_FILES`` it is skipped with a warning
and the next image is returned instead.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, List, Optional, Set, Tuple

from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from yacs.config import CfgNode as CN

from .common import README_HINT, BadFileError, describe_path, resolve_root

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_transform(train: bool, size: int) -> T.Compose:
    """The original transforms.

    Args:
        train: RandomResizedCrop(size) + RandomHorizontalFlip; otherwise Resize(int(size / 0.875)) +
            CenterCrop(size).
        size: output side (MODEL.IMAGE_SIZE[0]; 224 in the original files).

    Returns:
        A transform from a PIL image to a normalised (3, size, size) float32 tensor.
    """
    if train:
        steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(int(size / 0.875)), T.CenterCrop(size)]
    steps += [T.ToTensor(), T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)]
    return T.Compose(steps)


def checked_rgb_loader(path: str) -> Image.Image:
    """Opens an image as RGB; a file that cannot be decoded raises a BadFileError naming it."""
    try:
        with open(path, "rb") as fh:
            image = Image.open(fh)
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadFileError(path, f"{type(exc).__name__}: {exc}") from exc


class CheckedImageFolder(ImageFolder):
    """An ImageFolder whose unreadable images either raise a clear error or are skipped with a warning.

    Args:
        root: folder of class folders.
        transform: applied to each PIL image.
        skip_bad_files: skip an unreadable image (warning with its path) and return the next readable one.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, skip_bad_files: bool = False) -> None:
        super().__init__(root, transform=transform, loader=checked_rgb_loader)
        self.skip_bad_files = skip_bad_files
        self._bad: Set[int] = set()

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        if not self.skip_bad_files:
            return super().__getitem__(index)
        for attempt in range(len(self.samples)):
            i = (index + attempt) % len(self.samples)
            if i in self._bad:
                continue
            try:
                return super().__getitem__(i)
            except BadFileError as exc:
                self._bad.add(i)
                logger.warning("skipping unreadable image %s (DATASET.SKIP_BAD_FILES): %s", exc.path, exc)
        raise ValueError(f"no readable image left under {self.root}")


def class_folders(folder: str) -> List[str]:
    """Sorted names of the sub-folders of folder (empty when folder does not exist)."""
    if not os.path.isdir(folder):
        return []
    return sorted(e.name for e in os.scandir(folder) if e.is_dir())


def imagenet_split_dir(cfg: CN, train: bool) -> str:
    """The ImageFolder root of a split: ``ROOT/images/TRAIN_SET`` or ``ROOT/images/TEST_SET``."""
    split = cfg.DATASET.TRAIN_SET if train else cfg.DATASET.TEST_SET
    return os.path.join(resolve_root(cfg), "images", str(split))


def build_imagenet(cfg: CN, train: bool) -> Dataset:
    """Builds the ImageNet training or validation split.

    Args:
        cfg: configuration; reads DATASET.ROOT, DATA_DIR, DATASET.TRAIN_SET / TEST_SET, MODEL.IMAGE_SIZE and
            DATASET.SKIP_BAD_FILES.
        train: the training split (random crops), else the validation split (centre crops).

    Returns:
        A dataset of ``(image (3, S, S) float32, int label)`` with S = MODEL.IMAGE_SIZE[0].

    Raises:
        FileNotFoundError: the split folder is missing or holds no images.
    """
    folder = imagenet_split_dir(cfg, train)
    layout = (
        f"Expected one sub-folder per class with the images inside, e.g. {folder}/n01440764/*.JPEG "
        f"(DATASET.ROOT/images/DATASET.{'TRAIN_SET' if train else 'TEST_SET'}). Extract ImageNet there, "
        f"or point DATASET.ROOT / DATA_DIR at the folder that holds images/. {README_HINT}"
    )
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"ImageNet split not found: {describe_path(folder)}. {layout}")
    classes = class_folders(folder)
    if not classes:
        raise FileNotFoundError(f"ImageNet split {folder} holds no class folders. {layout}")
    size = int(cfg.MODEL.IMAGE_SIZE[0])
    try:
        dataset = CheckedImageFolder(folder, imagenet_transform(train, size), bool(cfg.DATASET.SKIP_BAD_FILES))
    except FileNotFoundError as exc:  # ImageFolder found class folders without image files
        raise FileNotFoundError(
            f"ImageNet split {folder}: a class folder holds no image files ({', '.join(IMG_EXTENSIONS)}); "
            f"torchvision says: {exc}. {layout}"
        ) from exc
    logger.info("ImageNet %s: %d images in %d classes", folder, len(dataset), len(dataset.classes))
    return dataset
