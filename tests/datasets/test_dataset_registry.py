"""Dataset names, root resolution and dataset_info."""
import os

import pytest

from mdeq.config import load_config
from mdeq.datasets import dataset_info, get_cls_dataset, resolve_root


def cfg_with(**dataset):
    cfg = load_config(None, [])
    for key, value in dataset.items():
        cfg.DATASET[key] = value
    return cfg


def test_resolve_root():
    cfg = cfg_with(ROOT="data/cifar10/")
    assert resolve_root(cfg) == "data/cifar10/"
    cfg.DATA_DIR = "/mnt/store"
    assert resolve_root(cfg) == os.path.join("/mnt/store", "data/cifar10/")
    cfg.DATASET.ROOT = "/abs/cifar"
    assert resolve_root(cfg) == "/abs/cifar"
    cfg.DATASET.ROOT = ""
    assert resolve_root(cfg) == "/mnt/store"


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError) as err:
        get_cls_dataset(cfg_with(DATASET="mnist"), train=True)
    msg = str(err.value)
    assert "mnist" in msg and "cifar10" in msg and "imagenet" in msg and "fashion_mnist" in msg
    with pytest.raises(ValueError, match="cityscapes"):
        dataset_info(cfg_with(DATASET="mpii"))
    with pytest.raises(ValueError):  # a segmentation set is not a classification set
        get_cls_dataset(cfg_with(DATASET="cityscapes"), train=True)


@pytest.mark.parametrize("name,expected", [
    ("cifar10", (3, 10)), ("CIFAR10", (3, 10)), ("fashion_mnist", (1, 10)), ("fashion-mnist", (1, 10)),
    ("fashionmnist", (1, 10)), ("cityscapes", (3, 19)),
])
def test_dataset_info(name, expected):
    cfg = cfg_with(DATASET=name, NUM_CLASSES=19)
    assert dataset_info(cfg) == {"in_channels": expected[0], "num_classes": expected[1]}
