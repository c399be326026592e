"""ImageNet as an ImageFolder: transforms, layout errors and unreadable files, on a tiny image tree."""
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mdeq.config import load_config
from mdeq.datasets import BadFileError, dataset_info, get_cls_dataset

CLASSES = ["n01440764", "n01443537", "n01484850"]


def write_tree(root, split, per_class=2, size=(40, 30)):
    rng = np.random.RandomState(len(split))
    for c, cls in enumerate(CLASSES):
        folder = os.path.join(root, "images", split, cls)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            pixels = rng.randint(0, 256, (size[1], size[0], 3)).astype(np.uint8)
            ext = "JPEG" if i % 2 == 0 else "png"
            Image.fromarray(pixels).save(os.path.join(folder, f"{cls}_{i}.{ext}"))


def make_cfg(root, skip=False):
    cfg = load_config(None, ["DATASET.DATASET", "imagenet", "DATASET.ROOT", str(root), "DATASET.TRAIN_SET",
                             "train", "DATASET.TEST_SET", "val", "MODEL.IMAGE_SIZE", "[32, 32]"])
    cfg.DATASET.SKIP_BAD_FILES = skip
    return cfg


def test_train_and_val_items(tmp_path):
    write_tree(str(tmp_path), "train")
    write_tree(str(tmp_path), "val", per_class=1, size=(50, 40))
    train = get_cls_dataset(make_cfg(tmp_path), train=True)
    val = get_cls_dataset(make_cfg(tmp_path), train=False)
    assert len(train) == 6 and len(val) == 3 and train.classes == CLASSES
    x, y = train[5]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and y == 2
    x, y = val[1]
    assert x.shape == (3, 32, 32) and y == 1
    assert dataset_info(make_cfg(tmp_path)) == {"in_channels": 3, "num_classes": 3}


def test_val_transform_is_resize_then_center_crop(tmp_path):
    write_tree(str(tmp_path), "val", per_class=1, size=(48, 48))
    x, _ = get_cls_dataset(make_cfg(tmp_path), train=False)[0]
    path = os.path.join(str(tmp_path), "images", "val", CLASSES[0], f"{CLASSES[0]}_0.JPEG")
    img = Image.open(path).convert("RGB").resize((36, 36), Image.BILINEAR)  # int(32 / 0.875) = 36
    ref = torch.from_numpy(np.asarray(img)[2:34, 2:34].copy()).permute(2, 0, 1).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    torch.testing.assert_close(x, (ref - mean) / std)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        get_cls_dataset(make_cfg(tmp_path), train=True)
    assert os.path.join(str(tmp_path), "images", "train") in str(err.value)
    assert "one sub-folder per class" in str(err.value)
    os.makedirs(tmp_path / "images" / "train")
    with pytest.raises(FileNotFoundError, match="holds no class folders"):
        get_cls_dataset(make_cfg(tmp_path), train=True)
    os.makedirs(tmp_path / "images" / "train" / "n0")
    with pytest.raises(FileNotFoundError, match="no image files"):
        get_cls_dataset(make_cfg(tmp_path), train=True)
    cfg = make_cfg(tmp_path / "elsewhere")
    cfg.MODEL.NUM_CLASSES = 1000
    assert dataset_info(cfg)["num_classes"] == 1000


def test_unreadable_image(tmp_path, caplog):
    write_tree(str(tmp_path), "val", per_class=1)
    bad = os.path.join(str(tmp_path), "images", "val", CLASSES[0], "broken.JPEG")
    with open(bad, "wb") as fh:
        fh.write(b"\xff\xd8 this is not a jpeg")
    ds = get_cls_dataset(make_cfg(tmp_path), train=False)
    index = [p for p, _ in ds.samples].index(bad)
    with pytest.raises(BadFileError) as err:
        ds[index]
    assert isinstance(err.value, ValueError) and bad in str(err.value)
    ds = get_cls_dataset(make_cfg(tmp_path, skip=True), train=False)
    with caplog.at_level(logging.WARNING):
        x, y = ds[index]
    assert x.shape == (3, 32, 32) and bad in caplog.text
