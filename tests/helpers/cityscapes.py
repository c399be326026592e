"""Writes a tiny Cityscapes tree in the real on-disk layout, for tests.

How to use it: ``from helpers.cityscapes import make_cityscapes_fixture``; ``tests/datasets/conftest.py``
offers it as the pytest fixture ``cityscapes_root``.

The tree (``root`` plays the part of ``data/``)::

    root/list/cityscapes/{train,val,test}.lst
    root/cityscapes/leftImg8bit/{train,val,test}/<city>/<city>_000000_0000NN_leftImg8bit.png
    root/cityscapes/gtFine/{train,val}/<city>/<city>_000000_0000NN_gtFine_labelIds.png

Every image is WIDTH x HEIGHT. Column x of a label holds the raw id ``ALL_IDS[(x + offset) % len(ALL_IDS)]``,
which covers all 34 raw ids and 255 (how ``-1``, the licence plate, is stored in uint8), so every train id and
every ignored id appears. The image encodes its label: red = the raw id of the pixel, green = 4 * column,
blue = 8 * row, which lets a test check that image and label stay aligned through crops and flips.
"""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 64, 32
ALL_IDS = list(range(34)) + [255]
SPLITS = {"train": ("aachen", 3), "val": ("frankfurt", 2), "test": ("berlin", 2)}


def fixture_arrays(offset: int) -> Dict[str, np.ndarray]:
    """The (HEIGHT, WIDTH, 3) uint8 RGB image and (HEIGHT, WIDTH) uint8 raw label of one sample."""
    cols = np.arange(WIDTH)
    raw_row = np.array([ALL_IDS[(x + offset) % len(ALL_IDS)] for x in cols], dtype=np.uint8)
    label = np.repeat(raw_row[None, :], HEIGHT, axis=0)
    image = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    image[..., 0] = label
    image[..., 1] = (4 * cols)[None, :]
    image[..., 2] = (8 * np.arange(HEIGHT))[:, None]
    return {"image": image, "label": label}


def make_cityscapes_fixture(root: str) -> Dict[str, List[dict]]:
    """Writes the tree under root.

    Args:
        root: the folder that plays ``data/`` (DATASET.ROOT).

    Returns:
        Per split, a list of dicts with ``image``/``label`` (absolute paths; label None for test), ``name``,
        and the ``rgb`` and ``raw`` arrays that were written.
    """
    list_dir = os.path.join(root, "list", "cityscapes")
    os.makedirs(list_dir, exist_ok=True)
    written: Dict[str, List[dict]] = {}
    offset = 0
    for split, (city, count) in SPLITS.items():
        lines, items = [], []
        for i in range(count):
            stem = f"{city}_000000_{19 + i:06d}"
            rel_img = f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"
            rel_lab = f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png"
            arrays = fixture_arrays(offset)
            offset += 7
            img_path = os.path.join(root, "cityscapes", rel_img)
            os.makedirs(os.path.dirname(img_path), exist_ok=True)
            Image.fromarray(arrays["image"]).save(img_path)
            lab_path = None
            if split != "test":
                lab_path = os.path.join(root, "cityscapes", rel_lab)
                os.makedirs(os.path.dirname(lab_path), exist_ok=True)
                Image.fromarray(arrays["label"]).save(lab_path)
                lines.append(f"{rel_img}\t{rel_lab}")
                name = f"{stem}_gtFine_labelIds"
            else:
                lines.append(rel_img)
                name = f"{stem}_leftImg8bit"
            items.append({"image": img_path, "label": lab_path, "name": name, "rgb": arrays["image"],
                          "raw": arrays["label"]})
        with open(os.path.join(list_dir, f"{split}.lst"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
        written[split] = items
    return written
