"""Cityscapes: label mapping, augmentation geometry, splits and errors, on a tiny fixture in the real layout."""
import logging
import os
import random

import numpy as np
import pytest
import torch
from cityscapes_fixture import HEIGHT, WIDTH

from mdeq.config import load_config
from mdeq.datasets import (CITYSCAPES_CLASS_NAMES, CITYSCAPES_PALETTE, BadFileError, Cityscapes, colorize,
                           convert_label, dataset_info, denormalize, get_seg_dataset, normalize)

IGNORE = 255
EXPECTED = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
            27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def make_cfg(root, **train):
    cfg = load_config(None, [])
    cfg.DATASET.DATASET = "cityscapes"
    cfg.DATASET.ROOT = root
    cfg.DATASET.NUM_CLASSES = 19
    cfg.DATASET.TRAIN_SET = "list/cityscapes/train.lst"
    cfg.DATASET.TEST_SET = "list/cityscapes/val.lst"
    cfg.TRAIN.IGNORE_LABEL = IGNORE
    cfg.TRAIN.IMAGE_SIZE = [32, 16]
    cfg.TRAIN.BASE_SIZE = 64
    cfg.TRAIN.MULTI_SCALE = False
    cfg.TRAIN.FLIP = False
    cfg.TEST.IMAGE_SIZE = [WIDTH, HEIGHT]
    cfg.TEST.BASE_SIZE = WIDTH
    for key, value in train.items():
        cfg.TRAIN[key] = value
    return cfg


def mapped(raw):
    return np.vectorize(lambda v: EXPECTED.get(int(v), IGNORE))(raw).astype(np.int64)


def assert_aligned(image, label):
    """The fixture's red channel holds the raw id: the label must be its mapping wherever it is not padding."""
    rgb = denormalize(image)
    red = rgb[..., 0].astype(np.int64)
    lab = label.numpy()
    np.testing.assert_array_equal(lab, mapped(red))


# ------------------------------------------------------------------------------------------------ mapping
def test_label_mapping_every_id():
    ids = np.arange(-1, 256)
    out = convert_label(ids, ignore_label=IGNORE)
    assert out.dtype == np.int64
    for raw, train_id in zip(ids, out):
        assert train_id == EXPECTED.get(int(raw), IGNORE), raw
    assert sorted(set(out.tolist()) - {IGNORE}) == list(range(19))
    # -1 as another ignore value, tensor input on the same footing
    out_t = convert_label(torch.arange(-1, 256), ignore_label=-1)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.int64
    np.testing.assert_array_equal(out_t.numpy(), np.where(out == IGNORE, -1, out))


def test_inverse_mapping_roundtrip_and_ignore():
    train_ids = np.arange(19)
    label_ids = convert_label(train_ids, inverse=True)
    assert label_ids.dtype == np.uint8
    assert [int(v) for v in label_ids] == [k for k, _ in sorted(EXPECTED.items(), key=lambda kv: kv[1])]
    np.testing.assert_array_equal(convert_label(label_ids, ignore_label=IGNORE), train_ids)
    assert convert_label(np.array([IGNORE, -1]), inverse=True).tolist() == [0, 0]


def test_constants_weights_palette_colorize(cityscapes_root):
    root, _ = cityscapes_root
    assert len(CITYSCAPES_CLASS_NAMES) == 19 and CITYSCAPES_CLASS_NAMES[0] == "road"
    ds = get_seg_dataset(make_cfg(root), "val")
    w = ds.class_weights
    assert w.dtype == torch.float32 and w.shape == (19,)
    assert w[0].item() == pytest.approx(0.8373) and w[-1].item() == pytest.approx(1.0507)
    assert CITYSCAPES_PALETTE.shape == (19, 3) and tuple(CITYSCAPES_PALETTE[0]) == (128, 64, 128)
    ids = np.array([[0, 18], [IGNORE, -1]])
    col = colorize(torch.as_tensor(ids))
    assert col.dtype == np.uint8 and col.shape == (2, 2, 3)
    assert tuple(col[0, 1]) == (119, 11, 32) and col[1].sum() == 0
    np.testing.assert_array_equal(ds.colorize(ids), col)


def test_normalize_denormalize_roundtrip():
    rgb = np.random.RandomState(0).randint(0, 256, (5, 7, 3)).astype(np.uint8)
    chw = torch.from_numpy(normalize(rgb).transpose(2, 0, 1))
    np.testing.assert_array_equal(denormalize(chw), rgb)


# ---------------------------------------------------------------------------------------------- val / test
def test_val_full_image_rgb_and_label(cityscapes_root):
    root, written = cityscapes_root
    ds = get_seg_dataset(make_cfg(root), "val")
    assert len(ds) == 2 and ds.has_labels and isinstance(ds, Cityscapes)
    image, label, size, name = ds[1]
    assert image.dtype == torch.float32 and image.shape == (3, HEIGHT, WIDTH)
    assert label.dtype == torch.int64 and label.shape == (HEIGHT, WIDTH)
    assert size.tolist() == [HEIGHT, WIDTH]
    assert name == written["val"][1]["name"]
    np.testing.assert_array_equal(denormalize(image), written["val"][1]["rgb"])  # BGR -> RGB done
    np.testing.assert_array_equal(label.numpy(), mapped(written["val"][1]["raw"]))


def test_val_center_crop(cityscapes_root):
    root, written = cityscapes_root
    cfg = make_cfg(root)
    cfg.TEST.CENTER_CROP_TEST = True
    cfg.TEST.IMAGE_SIZE = [32, 16]
    image, label, _, _ = get_seg_dataset(cfg, "val")[0]
    assert image.shape == (3, 16, 32) and label.shape == (16, 32)
    np.testing.assert_array_equal(denormalize(image), written["val"][0]["rgb"][8:24, 16:48])
    np.testing.assert_array_equal(label.numpy(), mapped(written["val"][0]["raw"][8:24, 16:48]))


def test_test_split_has_no_labels(cityscapes_root):
    root, written = cityscapes_root
    cfg = make_cfg(root)
    cfg.DATASET.TEST_SET = "list/cityscapes/test.lst"
    for split in ("test", "val"):  # a val list without labels is taken as a test list
        ds = get_seg_dataset(cfg, split)
        assert not ds.has_labels and len(ds) == 2
        image, label, size, name = ds[0]
        assert image.shape == (3, HEIGHT, WIDTH)
        assert label.shape == (HEIGHT, WIDTH) and bool((label == IGNORE).all())
        assert name == written["test"][0]["name"] and name.endswith("_leftImg8bit")
        np.testing.assert_array_equal(denormalize(image), written["test"][0]["rgb"])
    # a labelled list used as the test split: labels are not read
    cfg.DATASET.TEST_SET = "list/cityscapes/val.lst"
    assert not get_seg_dataset(cfg, "test").has_labels


def test_num_samples(cityscapes_root):
    root, _ = cityscapes_root
    cfg = make_cfg(root, NUM_SAMPLES=2)
    assert len(get_seg_dataset(cfg, "train")) == 2
    cfg.TRAIN.NUM_SAMPLES = 0
    assert len(get_seg_dataset(cfg, "train")) == 3
    cfg.TEST.NUM_SAMPLES = 1
    assert len(get_seg_dataset(cfg, "val")) == 1


# ------------------------------------------------------------------------------------------------- training
def test_train_crop_is_aligned_and_flips_both_ways(cityscapes_root):
    root, written = cityscapes_root
    ds = get_seg_dataset(make_cfg(root, FLIP=True), "train")
    random.seed(0)
    flipped = unflipped = 0
    for _ in range(30):
        image, label, size, name = ds[random.randrange(len(ds))]
        assert image.shape == (3, 16, 32) and label.shape == (16, 32)
        assert size.tolist() == [HEIGHT, WIDTH]
        assert_aligned(image, label)
        green = denormalize(image)[0, :, 1].astype(int)  # 4 * source column
        step = np.diff(green)
        assert np.all(step == 4) or np.all(step == -4)  # a contiguous crop, possibly mirrored
        if step[0] < 0:
            flipped += 1
        else:
            unflipped += 1
    assert flipped > 0 and unflipped > 0


def test_train_padding_uses_ignore_label_and_zero_image(cityscapes_root):
    root, written = cityscapes_root
    ds = get_seg_dataset(make_cfg(root, IMAGE_SIZE=[80, 40]), "train")  # crop larger than the 64x32 image
    image, label, _, _ = ds[0]
    assert image.shape == (3, 40, 80) and label.shape == (40, 80)
    assert bool((label[HEIGHT:, :] == IGNORE).all()) and bool((label[:, WIDTH:] == IGNORE).all())
    assert bool((image[:, HEIGHT:, :] == 0).all()) and bool((image[:, :, WIDTH:] == 0).all())  # mean colour
    np.testing.assert_array_equal(label[:HEIGHT, :WIDTH].numpy(), mapped(written["train"][0]["raw"]))
    np.testing.assert_array_equal(denormalize(image[:, :HEIGHT, :WIDTH]), written["train"][0]["rgb"])


def test_multi_scale_rescale_and_shapes(cityscapes_root):
    root, written = cityscapes_root
    # SCALE_FACTOR 0: the scale is exactly 0.5, so the 64x32 image becomes 32x16 inside a 48x24 crop
    ds = get_seg_dataset(make_cfg(root, MULTI_SCALE=True, SCALE_FACTOR=0, IMAGE_SIZE=[48, 24]), "train")
    _, label, _, _ = ds[0]
    assert label.shape == (24, 48)
    assert bool((label[16:, :] == IGNORE).all()) and bool((label[:, 32:] == IGNORE).all())
    np.testing.assert_array_equal(label[:16, :32].numpy(), mapped(written["train"][0]["raw"][::2, ::2]))
    ds = get_seg_dataset(make_cfg(root, MULTI_SCALE=True, SCALE_FACTOR=16, FLIP=True), "train")
    random.seed(1)
    valid = set(range(19)) | {IGNORE}
    for i in range(10):
        image, label, _, _ = ds[i % len(ds)]
        assert image.shape == (3, 16, 32) and label.shape == (16, 32)
        assert set(label.unique().tolist()) <= valid


def test_downsample_rate(cityscapes_root):
    root, _ = cityscapes_root
    full = get_seg_dataset(make_cfg(root, FLIP=True), "train")
    half = get_seg_dataset(make_cfg(root, FLIP=True, DOWNSAMPLERATE=2), "train")
    for seed in range(4):
        random.seed(seed)
        image_f, label_f, _, _ = full[0]
        random.seed(seed)
        image_h, label_h, _, _ = half[0]
        torch.testing.assert_close(image_f, image_h)  # the image keeps the crop size
        assert label_h.shape == (8, 16)
        torch.testing.assert_close(label_h, label_f[::2, ::2])


def test_dataloader_batches(cityscapes_root):
    root, _ = cityscapes_root
    ds = get_seg_dataset(make_cfg(root, FLIP=True, MULTI_SCALE=True), "train")
    images, labels, sizes, names = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert images.shape == (2, 3, 16, 32) and labels.shape == (2, 16, 32) and sizes.shape == (2, 2)
    assert len(names) == 2
    assert dataset_info(make_cfg(root)) == {"in_channels": 3, "num_classes": 19}


# --------------------------------------------------------------------------------------------------- errors
def test_missing_list_file(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        get_seg_dataset(make_cfg(str(tmp_path)), "train")
    msg = str(err.value)
    assert os.path.join(str(tmp_path), "list/cityscapes/train.lst") in msg
    assert "data/list/cityscapes" in msg and "leftImg8bit" in msg and "DATASET.TRAIN_SET" in msg


def test_bad_split_and_names(cityscapes_root):
    root, _ = cityscapes_root
    with pytest.raises(ValueError, match="extra_train"):
        get_seg_dataset(make_cfg(root), "trainval")
    with pytest.raises(ValueError, match="EXTRA_TRAIN_SET"):
        get_seg_dataset(make_cfg(root), "extra_train")
    cfg = make_cfg(root)
    cfg.DATASET.EXTRA_TRAIN_SET = "list/cityscapes/train.lst"
    assert len(get_seg_dataset(cfg, "extra_train")) == 3
    cfg.DATASET.DATASET = "cifar10"
    with pytest.raises(ValueError, match="cityscapes"):
        get_seg_dataset(cfg, "train")


def test_malformed_lists(cityscapes_root):
    root, _ = cityscapes_root
    lst = os.path.join(root, "list", "cityscapes")
    with open(os.path.join(lst, "empty.lst"), "w") as fh:
        fh.write("\n")
    cfg = make_cfg(root)
    cfg.DATASET.TRAIN_SET = "list/cityscapes/empty.lst"
    with pytest.raises(ValueError, match="empty.lst"):
        get_seg_dataset(cfg, "train")
    cfg.DATASET.TRAIN_SET = "list/cityscapes/test.lst"  # image-only lines cannot be trained on
    with pytest.raises(ValueError, match="test.lst:1"):
        get_seg_dataset(cfg, "train")


def test_missing_image_error_and_skip(cityscapes_root, caplog):
    root, written = cityscapes_root
    gone = written["train"][1]["image"]
    os.remove(gone)
    with pytest.raises(FileNotFoundError) as err:
        get_seg_dataset(make_cfg(root), "train")
    assert gone in str(err.value) and "SKIP_BAD_FILES" in str(err.value)
    cfg = make_cfg(root)
    cfg.DATASET.SKIP_BAD_FILES = True
    with caplog.at_level(logging.WARNING):
        ds = get_seg_dataset(cfg, "train")
    assert len(ds) == 2 and gone in caplog.text


def test_unreadable_files_error_and_skip(cityscapes_root, caplog):
    root, written = cityscapes_root
    bad = written["val"][0]["label"]
    with open(bad, "wb") as fh:
        fh.write(b"not a png")
    ds = get_seg_dataset(make_cfg(root), "val")
    with pytest.raises(BadFileError) as err:
        ds[0]
    assert isinstance(err.value, ValueError) and bad in str(err.value)
    cfg = make_cfg(root)
    cfg.DATASET.SKIP_BAD_FILES = True
    ds = get_seg_dataset(cfg, "val")
    with caplog.at_level(logging.WARNING):
        _, _, _, name = ds[0]
    assert name == written["val"][1]["name"] and bad in caplog.text


def test_label_size_mismatch_is_reported(cityscapes_root):
    root, written = cityscapes_root
    from PIL import Image

    Image.fromarray(np.zeros((HEIGHT // 2, WIDTH), np.uint8)).save(written["val"][0]["label"])
    with pytest.raises(BadFileError, match="gtFine_labelIds"):
        get_seg_dataset(make_cfg(root), "val")[0]
