"""Datasets: CIFAR-10, ImageNet, Fashion-MNIST (classification) and Cityscapes (segmentation).

Entry points used by the training and evaluation code:

* ``get_cls_dataset(cfg, train)``: items ``(image (C, H, W) float32, int label)``;
* ``get_seg_dataset(cfg, split)``: items ``(image (3, H, W) float32, label (H', W') int64, size (2,), name)``;
* ``dataset_info(cfg)``: ``{"in_channels": C, "num_classes": K}`` without reading the images;
* ``resolve_root(cfg)``: the dataset folder (DATASET.ROOT behind a non-empty DATA_DIR).

Problems on disk raise ``FileNotFoundError`` / ``ValueError`` with messages that name the path, what was
expected there and how to fix it; data/README.md describes every expected layout.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict

from torch.utils.data import Dataset
from yacs.config import CfgNode as CN

from .base_seg import BaseSegDataset, denormalize, normalize, resize_long_side
from .cifar10 import build_cifar10
from .cityscapes import (CITYSCAPES_CLASS_NAMES, CITYSCAPES_CLASS_WEIGHTS, CITYSCAPES_PALETTE, Cityscapes,
                         build_cityscapes, colorize, convert_label)
from .common import CLS_DATASETS, SEG_DATASETS, BadFileError, canonical_name, dataset_channels, resolve_root
from .fashion_mnist import FashionMNIST, build_fashion_mnist
from .imagenet import build_imagenet, class_folders, imagenet_split_dir

logger = logging.getLogger(__name__)

CLS_BUILDERS: Dict[str, Callable[[CN, bool], Dataset]] = {
    "cifar10": build_cifar10,
    "imagenet": build_imagenet,
    "fashion_mnist": build_fashion_mnist,
}
SEG_BUILDERS: Dict[str, Callable[[CN, str], BaseSegDataset]] = {
    "cityscapes": build_cityscapes,
}


def get_cls_dataset(cfg: CN, train: bool) -> Dataset:
    """Builds the classification dataset named by DATASET.DATASET.

    Args:
        cfg: configuration (DATASET.DATASET in cifar10, imagenet, fashion_mnist; "fashion-mnist" and
            "fashionmnist" are accepted).
        train: the training split, else the evaluation split.

    Returns:
        A dataset of ``(image (C, H, W) float32, int label)``.

    Raises:
        ValueError: unknown dataset name (the message lists the valid names) or corrupt files.
        FileNotFoundError: the data are missing.
    """
    name = canonical_name(cfg.DATASET.DATASET, CLS_DATASETS)
    return CLS_BUILDERS[name](cfg, train)


def get_seg_dataset(cfg: CN, split: str) -> BaseSegDataset:
    """Builds a split of the segmentation dataset named by DATASET.DATASET.

    Args:
        cfg: configuration (DATASET.DATASET = cityscapes).
        split: "train", "val", "test" or "extra_train".

    Returns:
        A segmentation dataset (see ``BaseSegDataset`` for its items).

    Raises:
        ValueError: unknown dataset or split name, malformed list file.
        FileNotFoundError: missing list file or listed files.
    """
    name = canonical_name(cfg.DATASET.DATASET, SEG_DATASETS)
    return SEG_BUILDERS[name](cfg, split)


def dataset_info(cfg: CN) -> Dict[str, int]:
    """Image channels and number of classes of the configured dataset, without reading any image.

    ImageNet counts the class folders of ``ROOT/images/TRAIN_SET`` and falls back to MODEL.NUM_CLASSES when
    that folder is missing; Cityscapes answers DATASET.NUM_CLASSES.

    Args:
        cfg: configuration.

    Returns:
        ``{"in_channels": int, "num_classes": int}``.

    Raises:
        ValueError: unknown dataset name; DATASET.PAD_TO or DATASET.GRAY_TO_RGB set for a dataset other than
            Fashion-MNIST.
    """
    name = canonical_name(cfg.DATASET.DATASET, CLS_DATASETS + SEG_DATASETS)
    if name != "fashion_mnist":
        for key, off in (("PAD_TO", 0), ("GRAY_TO_RGB", False)):
            if cfg.DATASET.get(key, off) != off:
                raise ValueError(f"DATASET.{key} applies to Fashion-MNIST only, not to {cfg.DATASET.DATASET}; "
                                 f"remove it or set it to {off}")
    channels = dataset_channels(cfg)
    if name in ("fashion_mnist", "cifar10"):
        return {"in_channels": channels, "num_classes": 10}
    if name == "imagenet":
        classes = class_folders(imagenet_split_dir(cfg, train=True))
        if not classes:
            logger.info("no ImageNet class folders found; taking num_classes from MODEL.NUM_CLASSES")
        return {"in_channels": channels, "num_classes": len(classes) or int(cfg.MODEL.NUM_CLASSES)}
    return {"in_channels": channels, "num_classes": int(cfg.DATASET.NUM_CLASSES)}


__all__ = [
    "BadFileError", "BaseSegDataset", "CITYSCAPES_CLASS_NAMES", "CITYSCAPES_CLASS_WEIGHTS", "CITYSCAPES_PALETTE",
    "CLS_BUILDERS", "Cityscapes", "FashionMNIST", "SEG_BUILDERS", "colorize", "convert_label", "dataset_info",
    "denormalize", "get_cls_dataset", "get_seg_dataset", "normalize", "resize_long_side", "resolve_root",
]
