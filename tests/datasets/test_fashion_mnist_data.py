"""Fashion-MNIST: IDX reading and validation, search order, tensor transforms, and the real Debian files."""
import gzip
import os

import numpy as np
import pytest
import torch

from mdeq.config import load_config
from mdeq.datasets import get_cls_dataset
from mdeq.datasets import fashion_mnist as fm

MEAN, STD = 0.2860, 0.3530


def write_idx(path, array, magic=None):
    """Writes array (uint8) in IDX format; gzip when path ends in .gz."""
    array = np.asarray(array, dtype=np.uint8)
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(header + array.tobytes())


def write_split(folder, prefix, n, gz, seed=0):
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, (n, 28, 28)).astype(np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    ext = ".gz" if gz else ""
    os.makedirs(folder, exist_ok=True)
    write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte{ext}"), images)
    write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{ext}"), labels)
    return images, labels


def make_cfg(root, augment=False, download=False):
    cfg = load_config(None, [])
    cfg.DATASET.DATASET = "fashion_mnist"
    cfg.DATASET.ROOT = str(root)
    cfg.DATASET.AUGMENT = augment
    cfg.DATASET.DOWNLOAD = download
    return cfg


@pytest.fixture
def no_system_copy(monkeypatch, tmp_path):
    monkeypatch.setattr(fm, "SYSTEM_DIR", str(tmp_path / "no-system-copy"))


@pytest.mark.parametrize("gz", [True, False])
def test_reads_idx_plain_and_gzip(tmp_path, no_system_copy, gz):
    images, labels = write_split(str(tmp_path), "train", 12, gz)
    write_split(str(tmp_path), "t10k", 5, gz, seed=1)
    ds = get_cls_dataset(make_cfg(tmp_path), train=True)
    assert isinstance(ds, fm.FashionMNIST) and len(ds) == 12
    x, y = ds[3]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and isinstance(y, int) and y == 3
    torch.testing.assert_close(x[0], (torch.from_numpy(images[3]).float() / 255 - MEAN) / STD)
    xb, yb = ds.get_batch([3, 0])
    assert xb.shape == (2, 1, 28, 28) and yb.tolist() == [3, 0]
    torch.testing.assert_close(xb[0], x)
    test = get_cls_dataset(make_cfg(tmp_path, augment=True), train=False)
    assert len(test) == 5 and not test.augment  # augmentation applies to training only


def _candidates(image):
    """Every crop-with-2-pixel-black-padding, with and without flip, of an (28, 28) uint8 image (normalised)."""
    padded = torch.nn.functional.pad(torch.from_numpy(image), (2, 2, 2, 2))
    out = []
    for oy in range(5):
        for ox in range(5):
            crop = padded[oy:oy + 28, ox:ox + 28]
            for c in (crop, crop.flip(-1)):
                out.append((c.float() / 255 - MEAN) / STD)
    return out


def test_augmentation_is_padded_crop_and_flip(tmp_path, no_system_copy):
    images, _ = write_split(str(tmp_path), "train", 4, gz=True)
    ds = get_cls_dataset(make_cfg(tmp_path, augment=True), train=True)
    torch.manual_seed(0)
    cands = _candidates(images[1])
    seen = set()
    for _ in range(40):
        x, _ = ds[1]
        match = [i for i, c in enumerate(cands) if torch.allclose(x[0], c)]
        assert match, "augmented image is not a padded crop / flip of the original"
        seen.add(match[0])
        xb, _ = ds.get_batch(torch.tensor([1, 1, 1]))
        for img in xb:
            assert any(torch.allclose(img[0], c) for c in cands)
    assert len(seen) > 5  # the crops really vary
    black = (0 - MEAN) / STD
    x, _ = ds.get_batch(torch.arange(4).repeat(10))
    assert x.min().item() == pytest.approx(black)  # padding is black in normalised units


def test_pad_to_and_gray_to_rgb_give_the_cifar_shape(tmp_path, no_system_copy):
    images, labels = write_split(str(tmp_path), "train", 6, gz=False)
    write_split(str(tmp_path), "t10k", 3, gz=False, seed=1)
    cfg = make_cfg(tmp_path)
    cfg.DATASET.PAD_TO = 32
    cfg.DATASET.GRAY_TO_RGB = True
    ds = get_cls_dataset(cfg, train=True)
    black = (0 - MEAN) / STD
    expected = torch.full((32, 32), black)
    expected[2:30, 2:30] = (torch.from_numpy(images[4]).float() / 255 - MEAN) / STD  # centred, 2-pixel border
    x, y = ds[4]
    assert x.shape == (3, 32, 32) and y == int(labels[4])
    for c in range(3):
        torch.testing.assert_close(x[c], expected)
    xb, _ = ds.get_batch([4, 0])
    assert xb.shape == (2, 3, 32, 32) and xb.is_contiguous()
    torch.testing.assert_close(xb[0], x)
    from mdeq.datasets import dataset_info
    from mdeq.models.mdeq import input_channels
    assert dataset_info(cfg)["in_channels"] == 3 and input_channels(cfg) == 3
    cfg.DATASET.PAD_TO = 31  # odd difference: the extra row and column at the bottom and right
    x, _ = get_cls_dataset(cfg, train=False)[0]
    is_black = torch.isclose(x, torch.tensor(black))
    assert x.shape == (3, 31, 31) and is_black[:, :1].all() and is_black[:, -2:].all()
    assert is_black[:, :, :1].all() and is_black[:, :, -2:].all() and not is_black[:, 1:29, 1:29].all()
    cfg.DATASET.PAD_TO = 20
    with pytest.raises(ValueError, match="DATASET.PAD_TO 20 is smaller than the 28x28 images"):
        get_cls_dataset(cfg, train=True)


def test_pad_to_and_gray_to_rgb_are_refused_for_other_datasets():
    from mdeq.datasets import dataset_info
    cfg = load_config(None, ["DATASET.DATASET", "cifar10", "DATASET.GRAY_TO_RGB", "True"])
    with pytest.raises(ValueError, match="DATASET.GRAY_TO_RGB applies to Fashion-MNIST only"):
        dataset_info(cfg)


def test_bad_magic_truncation_and_corrupt_gzip(tmp_path, no_system_copy):
    write_split(str(tmp_path), "train", 3, gz=False)
    images_path = os.path.join(str(tmp_path), "train-images-idx3-ubyte")
    write_idx(images_path, np.zeros((3, 28, 28)), magic=0x0801)
    with pytest.raises(ValueError, match="magic number") as err:
        get_cls_dataset(make_cfg(tmp_path), train=True)
    assert images_path in str(err.value)
    write_split(str(tmp_path), "train", 3, gz=False)
    with open(images_path, "rb") as fh:
        raw = fh.read()
    with open(images_path, "wb") as fh:
        fh.write(raw[:-10])
    with pytest.raises(ValueError, match="truncated") as err:
        get_cls_dataset(make_cfg(tmp_path), train=True)
    assert images_path in str(err.value)
    os.remove(images_path)
    with open(images_path + ".gz", "wb") as fh:
        fh.write(gzip.compress(raw)[:40])
    with pytest.raises(ValueError) as err:
        get_cls_dataset(make_cfg(tmp_path), train=True)
    assert images_path + ".gz" in str(err.value)


def test_count_mismatch(tmp_path, no_system_copy):
    write_split(str(tmp_path), "t10k", 3, gz=True)
    write_idx(os.path.join(str(tmp_path), "t10k-labels-idx1-ubyte.gz"), np.zeros(4))
    with pytest.raises(ValueError, match="do not belong together"):
        get_cls_dataset(make_cfg(tmp_path), train=False)


def test_search_order_root_torchvision_layout_then_system(tmp_path, monkeypatch):
    system = tmp_path / "system"
    write_split(str(system), "train", 6, gz=True)
    monkeypatch.setattr(fm, "SYSTEM_DIR", str(system))
    root = tmp_path / "root"
    assert len(get_cls_dataset(make_cfg(root), train=True)) == 6  # root missing: system copy
    write_split(str(root / "FashionMNIST" / "raw"), "train", 4, gz=False)
    assert len(get_cls_dataset(make_cfg(root), train=True)) == 4  # torchvision's layout under the root
    write_split(str(root), "train", 2, gz=True)
    assert len(get_cls_dataset(make_cfg(root), train=True)) == 2  # the root itself first


def test_not_found_and_failed_download(tmp_path, no_system_copy, monkeypatch):
    root = tmp_path / "fm"
    with pytest.raises(FileNotFoundError) as err:
        get_cls_dataset(make_cfg(root), train=True)
    msg = str(err.value)
    assert str(root) in msg and "train-images-idx3-ubyte" in msg and "DATASET.DOWNLOAD" in msg

    import torchvision

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", offline)
    with pytest.raises(FileNotFoundError, match="download into .* failed: OSError: network is unreachable"):
        get_cls_dataset(make_cfg(root, download=True), train=False)


def test_name_aliases(tmp_path, no_system_copy):
    write_split(str(tmp_path), "t10k", 2, gz=True)
    for name in ("fashion-mnist", "FashionMNIST", "fashionmnist"):
        cfg = make_cfg(tmp_path)
        cfg.DATASET.DATASET = name
        assert len(get_cls_dataset(cfg, train=False)) == 2


def test_real_debian_files():
    """The files of Debian's dataset-fashion-mnist package, installed here and in CI."""
    assert os.path.isdir(fm.SYSTEM_DIR), f"{fm.SYSTEM_DIR} missing: install the dataset-fashion-mnist package"
    cfg = make_cfg("")
    train = get_cls_dataset(cfg, train=True)
    test = get_cls_dataset(cfg, train=False)
    assert len(train) == 60000 and len(test) == 10000
    for ds in (train, test):
        assert ds.data.shape[1:] == (28, 28) and ds.data.dtype == torch.uint8
        assert sorted(ds.targets.unique().tolist()) == list(range(10))
    x, y = train.get_batch(torch.arange(256))
    assert x.shape == (256, 1, 28, 28) and 0 <= int(y.min()) and int(y.max()) <= 9
    # the normalisation constants describe the data
    scaled = train.data[:5000].float() / 255
    assert scaled.mean().item() == pytest.approx(MEAN, abs=0.01)
    assert scaled.std().item() == pytest.approx(STD, abs=0.01)
