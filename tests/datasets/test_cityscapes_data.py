"""Cityscapes: label mapping, augmentation geometry, splits and errors, on a tiny fixture in the real layout; the
training transform against the original code's (tests/data/original_seg_oracle.json, see tests/data/README_seg.md).
"""
import json
import logging
import os
import random

import numpy as np
import pytest
import torch
from helpers.cityscapes import HEIGHT, WIDTH

from mdeq.config import load_config
from mdeq.datasets import (CITYSCAPES_CLASS_NAMES, CITYSCAPES_CLASS_WEIGHTS, CITYSCAPES_PALETTE, BadFileError,
                           BaseSegDataset, Cityscapes, colorize, convert_label, dataset_info, denormalize,
                           get_seg_dataset, normalize)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with open(os.path.join(ROOT, "tests", "data", "original_seg_oracle.json")) as _fh:
    _ORACLE = json.load(_fh)
CROPS, MAPPING = _ORACLE["crops"], _ORACLE["label_mapping"]

IGNORE = 255
EXPECTED = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
            27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def crop_cfg(root, **train):
    """Training crops at scale 1: multi-scale on with the scale fixed at 0.5 of a base size twice the image."""
    return make_cfg(root, MULTI_SCALE=True, SCALE_FACTOR=0, BASE_SIZE=2 * WIDTH, **train)


def seed(value):
    random.seed(value)
    np.random.seed(value)


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
    ds = get_seg_dataset(crop_cfg(root, FLIP=True), "train")
    seed(0)
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


def test_train_padding_uses_ignore_label_and_black_image(cityscapes_root):
    root, written = cityscapes_root
    ds = get_seg_dataset(crop_cfg(root, IMAGE_SIZE=[80, 40]), "train")  # crop larger than the 64x32 image
    image, label, _, _ = ds[0]
    assert image.shape == (3, 40, 80) and label.shape == (40, 80)
    assert bool((label[HEIGHT:, :] == IGNORE).all()) and bool((label[:, WIDTH:] == IGNORE).all())
    # black padded before normalisation, as the original: -mean / std in every padded pixel
    black = torch.from_numpy(normalize(np.zeros((1, 1, 3), np.uint8))).reshape(3, 1, 1)
    assert torch.allclose(black.reshape(-1), torch.tensor([-2.1179, -2.0357, -1.8044]), atol=1e-4)
    assert torch.equal(image[:, HEIGHT:, :], black.expand(3, 40 - HEIGHT, 80))
    assert torch.equal(image[:, :, WIDTH:], black.expand(3, 40, 80 - WIDTH))
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
    full = get_seg_dataset(crop_cfg(root, FLIP=True), "train")
    half = get_seg_dataset(crop_cfg(root, FLIP=True, DOWNSAMPLERATE=2), "train")
    for value in range(4):
        seed(value)
        image_f, label_f, _, _ = full[0]
        seed(value)
        image_h, label_h, _, _ = half[0]
        torch.testing.assert_close(image_f, image_h)  # the image keeps the crop size
        assert label_h.shape == (8, 16)
        torch.testing.assert_close(label_h, label_f[::2, ::2])


def test_without_multi_scale_training_uses_the_full_image(cityscapes_root):
    """The original crops only inside its multi-scale step: without it, the full image (flipped or not)."""
    root, written = cityscapes_root
    ds = get_seg_dataset(make_cfg(root, IMAGE_SIZE=[32, 16]), "train")
    image, label, _, _ = ds[0]
    assert image.shape == (3, HEIGHT, WIDTH) and label.shape == (HEIGHT, WIDTH)
    np.testing.assert_array_equal(denormalize(image), written["train"][0]["rgb"])
    np.testing.assert_array_equal(label.numpy(), mapped(written["train"][0]["raw"]))


@pytest.mark.parametrize("case", range(len(CROPS["cases"])))
def test_training_sample_equals_the_original_code(case):
    """Rescale, black padding, crop, flip and label downsampling of a tiny image after the same seeds."""
    rec = CROPS["cases"][case]
    rgb = np.array(CROPS["image_rgb"], dtype=np.uint8)
    label = np.array(CROPS["label"], dtype=np.uint8)
    ds = _bare_dataset(rec)
    seed(rec["seed"])
    image, lab = ds.gen_sample(rgb, label)
    expected_image = np.array(rec["image"], dtype=np.float32)  # (3, h, w)
    np.testing.assert_allclose(image.transpose(2, 0, 1), expected_image, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(lab, np.array(rec["label_out"]))


def _bare_dataset(rec):
    """A BaseSegDataset without files (gen_sample needs none)."""
    ds = BaseSegDataset.__new__(BaseSegDataset)
    ds.train, ds.has_labels, ds.center_crop = True, True, False
    ds.ignore_label = CROPS["ignore_label"]
    ds.crop_size = tuple(rec["crop_size"])
    ds.base_size, ds.scale_factor = rec["base_size"], rec["scale_factor"]
    ds.multi_scale, ds.flip, ds.downsample_rate = rec["multi_scale"], rec["flip"], rec["downsample_rate"]
    return ds


def test_oracle_crops_include_black_padding():
    """Some recorded crops are padded (a bottom or right band all ignore); their image there is black."""
    black = normalize(np.zeros((1, 1, 3), np.uint8)).reshape(3, 1)
    found = 0
    for rec in CROPS["cases"]:
        if rec["downsample_rate"] != 1:
            continue
        label = np.array(rec["label_out"])
        image = np.array(rec["image"]).reshape(3, -1)
        pad = np.zeros(label.shape, bool)
        rows = np.nonzero((label == CROPS["ignore_label"]).all(axis=1))[0]
        if len(rows) and rows[-1] == label.shape[0] - 1:
            pad[rows[0]:] = True
        if pad.any():
            found += 1
            np.testing.assert_allclose(image[:, pad.reshape(-1)], np.broadcast_to(black, (3, int(pad.sum()))),
                                       atol=1e-5)
    assert found > 0


def test_label_mapping_and_weights_equal_the_original():
    raw_to_train = MAPPING["raw_to_train"]
    ours = convert_label(np.arange(256), ignore_label=IGNORE)
    # the original leaves ids 34..254 as they are (they never occur in labelIds files); the rest agree
    for raw in list(range(34)) + [255]:
        assert ours[raw] == raw_to_train[raw], raw
    assert raw_to_train[34:255] == list(range(34, 255))
    assert list(CITYSCAPES_CLASS_WEIGHTS) == pytest.approx(MAPPING["class_weights"], rel=1e-6)


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
