"""Cityscapes (fine annotations, 19 training classes) read from list files, as the original project does.

Expected layout (see data/README.md), with ``DATASET.ROOT = data/``::

    data/list/cityscapes/{train,val,test}.lst     one sample a line (DATASET.TRAIN_SET / TEST_SET / ...)
    data/cityscapes/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    data/cityscapes/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

A line reads ``leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png
gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png`` (paths relative to ``ROOT/cityscapes/``); lines
of the test list name the image only. Labels are the 34 raw ``labelIds``; ``convert_label`` maps them to the 19
train ids and every other id to ``TRAIN.IGNORE_LABEL``.

The test split has no labels: its items carry an all-``ignore_label`` label map of the image's size (so that
batches have the usual four fields) and the dataset's ``has_labels`` is False.
"""
from __future__ import annotations

import os
from types import MappingProxyType
from typing import Mapping, Union

import numpy as np
import torch
from yacs.config import CfgNode as CN

from .base_seg import BaseSegDataset, read_list_file
from .common import README_HINT, resolve_root

CITYSCAPES_CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)

# raw labelIds -> train ids; every id not listed (-1, 0..6, 9, 10, 14..16, 18, 29, 30, ...) is ignored (the
# original left ids 34..254 unmapped; they never occur in Cityscapes labelIds files)
LABEL_TO_TRAIN_ID: Mapping[int, int] = MappingProxyType({
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
})
TRAIN_ID_TO_LABEL_ID: Mapping[int, int] = MappingProxyType({v: k for k, v in LABEL_TO_TRAIN_ID.items()})
UNLABELED_ID = 0  # raw id written for ignored pixels by the inverse mapping

# the original project's class weights for the weighted cross-entropy (one per train id)
CITYSCAPES_CLASS_WEIGHTS = (0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023, 0.9539,
                            0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507)

# the standard Cityscapes colours of the 19 train ids (RGB)
CITYSCAPES_PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0),
    (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
], dtype=np.uint8)
CITYSCAPES_PALETTE.setflags(write=False)

LAYOUT_HINT = (
    "Expected layout with DATASET.ROOT=data/: list files data/list/cityscapes/{train,val,test}.lst whose lines "
    "read 'leftImg8bit/<split>/<city>/<name>_leftImg8bit.png gtFine/<split>/<city>/<name>_gtFine_labelIds.png' "
    "(image only for test.lst), images under data/cityscapes/leftImg8bit/... and labels under "
    "data/cityscapes/gtFine/... Set DATASET.TRAIN_SET / TEST_SET / EXTRA_TRAIN_SET to the list files "
    f"(relative to DATASET.ROOT). {README_HINT}"
)

ArrayLike = Union[np.ndarray, torch.Tensor]


def _lookup_tables(ignore_label: int):
    forward = np.full(256, ignore_label, dtype=np.int64)  # raw id (0..255) -> train id
    for label_id, train_id in LABEL_TO_TRAIN_ID.items():
        forward[label_id] = train_id
    inverse = np.full(len(CITYSCAPES_CLASS_NAMES), UNLABELED_ID, dtype=np.uint8)  # train id -> raw id
    for train_id, label_id in TRAIN_ID_TO_LABEL_ID.items():
        inverse[train_id] = label_id
    return forward, inverse


def convert_label(label: ArrayLike, inverse: bool = False, ignore_label: int = 255) -> ArrayLike:
    """Maps raw Cityscapes label ids to train ids, or train ids back to label ids.

    Args:
        label: integer map of any shape (array or tensor on any device).
        inverse: map train ids 0..18 to label ids (for test-split PNGs); any other value (the ignore label)
            becomes 0 ("unlabeled").
        ignore_label: train id of every raw id outside the 19 classes (-1 and 255 included).

    Returns:
        The mapped map, same shape and kind as label: int64 train ids, or uint8 label ids with inverse.
    """
    forward, inv = _lookup_tables(ignore_label)
    table, default = (inv, UNLABELED_ID) if inverse else (forward, ignore_label)
    if isinstance(label, torch.Tensor):
        table_t = torch.as_tensor(table, device=label.device)
        idx = label.long()
        valid = (idx >= 0) & (idx < len(table))
        out = table_t[idx.clamp(0, len(table) - 1)]
        return torch.where(valid, out, torch.full_like(out, default))
    idx = np.asarray(label).astype(np.int64)
    valid = (idx >= 0) & (idx < len(table))
    return np.where(valid, table[np.clip(idx, 0, len(table) - 1)], table.dtype.type(default))


def colorize(train_ids: ArrayLike) -> np.ndarray:
    """Colours an (H, W) map of train ids with the Cityscapes palette (ignored pixels black).

    Args:
        train_ids: (H, W) integer array or tensor.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    ids = train_ids.detach().cpu().numpy() if isinstance(train_ids, torch.Tensor) else np.asarray(train_ids)
    ids = ids.astype(np.int64)
    valid = (ids >= 0) & (ids < len(CITYSCAPES_PALETTE))
    out = CITYSCAPES_PALETTE[np.clip(ids, 0, len(CITYSCAPES_PALETTE) - 1)]  # (H, W, 3)
    out[~valid] = 0
    return out


class Cityscapes(BaseSegDataset):
    """Cityscapes with the 19 training classes; see ``BaseSegDataset`` for the arguments and items.

    Attributes:
        class_weights: (19,) float32 tensor of the original per-class loss weights.
        palette: (19, 3) uint8 colours of the train ids.
    """

    num_classes = len(CITYSCAPES_CLASS_NAMES)
    class_names = CITYSCAPES_CLASS_NAMES
    palette = CITYSCAPES_PALETTE
    label_mapping = LABEL_TO_TRAIN_ID
    inverse_label_mapping = TRAIN_ID_TO_LABEL_ID

    @property
    def class_weights(self) -> torch.Tensor:
        """(19,) float32 per-class weights of the original weighted cross-entropy."""
        return torch.tensor(CITYSCAPES_CLASS_WEIGHTS, dtype=torch.float32)

    def convert_label(self, label: ArrayLike, inverse: bool = False) -> ArrayLike:
        """Raw label ids -> train ids (ignored ids -> ignore_label), or back with inverse."""
        return convert_label(label, inverse=inverse, ignore_label=self.ignore_label)

    def colorize(self, train_ids: ArrayLike) -> np.ndarray:
        """(H, W) train ids -> (H, W, 3) uint8 RGB in the Cityscapes palette."""
        return colorize(train_ids)


SPLIT_KEYS = {"train": "TRAIN_SET", "extra_train": "EXTRA_TRAIN_SET", "val": "TEST_SET", "test": "TEST_SET"}


def build_cityscapes(cfg: CN, split: str) -> Cityscapes:
    """Builds a Cityscapes split from the configuration.

    Args:
        cfg: configuration; reads DATASET.* (ROOT, TRAIN_SET, TEST_SET, EXTRA_TRAIN_SET, SKIP_BAD_FILES),
            DATA_DIR, TRAIN.* (IMAGE_SIZE, BASE_SIZE, MULTI_SCALE, SCALE_FACTOR, FLIP, DOWNSAMPLERATE,
            IGNORE_LABEL, NUM_SAMPLES) and TEST.* (IMAGE_SIZE, BASE_SIZE, CENTER_CROP_TEST, NUM_SAMPLES).
        split: "train" / "extra_train" (augmented, lists DATASET.TRAIN_SET / EXTRA_TRAIN_SET), "val" (full
            images of DATASET.TEST_SET; a list without labels is taken as a test list) or "test" (DATASET.TEST_SET,
            images only).

    Returns:
        The dataset.

    Raises:
        ValueError: unknown split, empty list key, malformed list.
        FileNotFoundError: missing list file or listed files.
    """
    if split not in SPLIT_KEYS:
        raise ValueError(f"unknown segmentation split {split!r}; valid splits are {', '.join(SPLIT_KEYS)}")
    key = SPLIT_KEYS[split]
    list_name = str(cfg.DATASET[key])
    if not list_name:
        raise ValueError(f"split {split!r} needs a list file in DATASET.{key}, which is empty. {LAYOUT_HINT}")
    root = resolve_root(cfg)
    list_path = os.path.join(root, list_name)
    data_root = os.path.join(root, "cityscapes")
    train = split in ("train", "extra_train")
    labelled = {"train": True, "extra_train": True, "val": None, "test": False}[split]
    hint = f"(DATASET.{key} = {list_name!r} under DATASET.ROOT = {root!r}). {LAYOUT_HINT}"
    samples, has_labels = read_list_file(list_path, data_root, labelled, hint)
    section = cfg.TRAIN if train else cfg.TEST
    width, height = section.IMAGE_SIZE
    return Cityscapes(
        samples,
        has_labels=has_labels,
        train=train,
        ignore_label=cfg.TRAIN.IGNORE_LABEL,
        crop_size=(height, width),
        base_size=section.BASE_SIZE,
        multi_scale=train and bool(cfg.TRAIN.MULTI_SCALE),
        scale_factor=cfg.TRAIN.SCALE_FACTOR,
        flip=train and bool(cfg.TRAIN.FLIP),
        downsample_rate=cfg.TRAIN.DOWNSAMPLERATE if train else 1,
        center_crop=not train and bool(cfg.TEST.CENTER_CROP_TEST),
        num_samples=section.NUM_SAMPLES,
        skip_bad_files=bool(cfg.DATASET.SKIP_BAD_FILES),
        layout_hint=hint,
    )
