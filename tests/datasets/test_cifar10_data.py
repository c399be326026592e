"""CIFAR-10 through torchvision on a tiny fixture in the cifar-10-batches-py pickle layout."""
import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torchvision

from mdeq.config import load_config
from mdeq.datasets import get_cls_dataset

MEAN = torch.tensor([0.4914, 0.4822, 0.4465])[:, None, None]
STD = torch.tensor([0.2023, 0.1994, 0.2010])[:, None, None]


def write_cifar(root, per_batch=2, n_test=3):
    """Writes data_batch_1..5, test_batch and batches.meta with a few random images; returns the test arrays."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(0)
    out = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        data = rng.randint(0, 256, (n, 3072)).astype(np.uint8)  # rows: 1024 red, 1024 green, 1024 blue
        labels = [int(v) for v in rng.randint(0, 10, n)]
        with open(os.path.join(folder, name), "wb") as fh:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, fh)
        out[name] = (data, labels)
    with open(os.path.join(folder, "batches.meta"), "wb") as fh:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"], "num_cases_per_batch": per_batch}, fh)
    return out


@pytest.fixture
def skip_md5(monkeypatch):
    """The fixture files cannot match torchvision's checksums: bypass the check in this test only."""
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)


def make_cfg(root, augment=True, download=False):
    cfg = load_config(None, ["DATASET.DATASET", "cifar10", "DATASET.ROOT", str(root)])
    cfg.DATASET.AUGMENT = augment
    cfg.DATASET.DOWNLOAD = download
    return cfg


def test_test_split_values(tmp_path, skip_md5):
    arrays = write_cifar(str(tmp_path))
    ds = get_cls_dataset(make_cfg(tmp_path), train=False)
    assert len(ds) == 3
    x, y = ds[1]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and isinstance(y, int)
    data, labels = arrays["test_batch"]
    expected = (torch.from_numpy(data[1].reshape(3, 32, 32)).float() / 255 - MEAN) / STD
    torch.testing.assert_close(x, expected)
    assert y == labels[1]


def test_train_split_with_and_without_augmentation(tmp_path, skip_md5):
    arrays = write_cifar(str(tmp_path))
    plain = get_cls_dataset(make_cfg(tmp_path, augment=False), train=True)
    assert len(plain) == 10
    data, labels = arrays["data_batch_1"]
    x, y = plain[0]
    torch.testing.assert_close(x, (torch.from_numpy(data[0].reshape(3, 32, 32)).float() / 255 - MEAN) / STD)
    assert y == labels[0]
    augmented = get_cls_dataset(make_cfg(tmp_path, augment=True), train=True)
    torch.manual_seed(0)
    outs = [augmented[0][0] for _ in range(8)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any(not torch.equal(o, x) for o in outs)  # random crops / flips change the image


def test_missing_files_without_download(tmp_path):
    root = tmp_path / "cifar10"
    with pytest.raises(FileNotFoundError) as err:
        get_cls_dataset(make_cfg(root, download=False), train=True)
    msg = str(err.value)
    assert str(root) in msg and "cifar-10-batches-py" in msg and "data_batch_1" in msg
    assert "DATASET.DOWNLOAD" in msg


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", offline)
    root = tmp_path / "cifar10"
    with pytest.raises(FileNotFoundError) as err:
        get_cls_dataset(make_cfg(root, download=True), train=False)
    msg = str(err.value)
    assert "CIFAR-10 not found" in msg and "download failed" in msg and "no network" in msg


def test_corrupt_files(tmp_path):
    write_cifar(str(tmp_path))  # checksums do not match and are not bypassed here
    with pytest.raises(ValueError, match="corrupt"):
        get_cls_dataset(make_cfg(tmp_path), train=False)
