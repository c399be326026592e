"""Helpers of the tests that run the tools: data fixtures in real on-disk formats, running a tool in-process or in
a subprocess, and reading its logs; and the pytest fixtures ``kit`` (these helpers as one namespace),
``restore_process_state`` and ``skip_cifar_md5``, which a conftest registers by importing them.

Every fixture is CPU-sized: a model with two 8-channel branches (:data:`helpers.tiny.CLS_RUN`), a handful of
32x32 or 28x28 images.
"""
import glob
import importlib.util
import logging
import os
import pickle
import re
import socket
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.tiny import CLS_RUN

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/helpers/..
TOOLS = os.path.join(REPO, "tools")

FASHION_CFG = os.path.join(REPO, "experiments", "fashion_mnist", "cls_mdeq_quick.yaml")
CIFAR_CFG = os.path.join(REPO, "experiments", "cifar", "cls_mdeq_TINY.yaml")
IMAGENET_CFG = os.path.join(REPO, "experiments", "imagenet", "cls_mdeq_SMALL.yaml")

TINY_MODEL = list(CLS_RUN)

# The log lines of training and evaluation (the hooks and validate in lib/core write them; the timestamp first).
NUM = r"-?\d+\.\d+"
TRAIN_LINE = re.compile(
    rf"Epoch: \[(?P<epoch>\d+)\]\[(?P<i>\d+)/(?P<total>\d+)\]\tTime {NUM}s \({NUM}s\)\tSpeed {NUM} samples/s\t"
    rf"Data {NUM}s \({NUM}s\)\tLoss (?P<loss>{NUM}) \({NUM}\)\tAccuracy@1 (?P<top1>{NUM}) \({NUM}\)\t"
    rf"Accuracy@5 (?P<top5>{NUM}) \({NUM}\)\tlr {NUM}e[-+]\d+\tETA [\d:]+ \(epoch\), [\d:]+ \(run\)\t"
    rf"(?P<mode>unrolled|equilibrium)")
TEST_LINE = re.compile(
    rf"Test: Time {NUM}\tLoss (?P<loss>{NUM})\tError@1 (?P<err1>{NUM})\tError@5 (?P<err5>{NUM})\t"
    rf"Accuracy@1 (?P<top1>{NUM})\tAccuracy@5 (?P<top5>{NUM})\t\((?P<count>\d+) images")


def load_tool(name):
    """The module of tools/<name>.py, or of pretrained_models/extract_state_dict.py (not packages)."""
    folder = os.path.join(REPO, "pretrained_models") if name == "extract_state_dict" else TOOLS
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", os.path.join(folder, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call_tool(name, argv):
    """Runs tools/<name>.py's main(argv) in this process and returns its exit code."""
    return load_tool(name).main(list(argv))


def run_subprocess(args, timeout=240, env=None):
    """Runs ``python args...`` from the repository root; returns (exit code, stdout + stderr).

    One thread per process (OMP_NUM_THREADS=1): the test machines have very few cores.
    """
    full_env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MDEQ_TRACEBACK"):
        full_env.pop(key, None)
    full_env.update(env or {})
    try:
        proc = subprocess.run([sys.executable] + list(args), cwd=REPO, env=full_env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"") + (exc.stderr or b"")
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        pytest.fail(f"python {' '.join(args)} did not finish within {timeout} s; output:\n{out[-4000:]}")
    return proc.returncode, proc.stdout + proc.stderr


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_files(log_dir, phase):
    """The text logs of one phase ("train" / "valid") under a LOG_DIR/<dataset>/<cfg> folder."""
    return sorted(glob.glob(os.path.join(log_dir, f"*_{phase}.log")))


def read_log(log_dir, phase):
    files = log_files(log_dir, phase)
    assert len(files) == 1, f"expected one {phase} log in {log_dir}, found {files}"
    with open(files[0]) as fh:
        return fh.read()


def parse_test_lines(text):
    return [m.groupdict() for m in TEST_LINE.finditer(text)]


def parse_train_lines(text):
    return [m.groupdict() for m in TRAIN_LINE.finditer(text)]


# ----------------------------------------------------------------------------------------- data fixtures
def write_idx(path, array):
    """An IDX file of unsigned bytes (the Fashion-MNIST format)."""
    array = np.asarray(array, dtype=np.uint8)
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with open(path, "wb") as fh:
        fh.write(header + array.tobytes())


def write_fashion_mnist(root, n_train, n_test, seed=0):
    """train-* and t10k-* IDX files with random 28x28 images and labels 0..9."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.RandomState(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte"), rng.randint(0, 256, (n, 28, 28)))
        write_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte"), rng.randint(0, 10, n))
    return root


def write_cifar(root, per_batch=2, n_test=6, test_labels=None, seed=0):
    """cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} with random images."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(seed)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        data = rng.randint(0, 256, (n, 3072)).astype(np.uint8)  # rows: 1024 red, 1024 green, 1024 blue values
        labels = [int(v) for v in rng.randint(0, 10, n)]
        if name == "test_batch" and test_labels is not None:
            labels = [int(v) for v in test_labels]
        with open(os.path.join(folder, name), "wb") as fh:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, fh)
    with open(os.path.join(folder, "batches.meta"), "wb") as fh:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"], "num_cases_per_batch": per_batch}, fh)
    return root


IMAGENET_CLASSES = ["n01440764", "n01443537", "n01484850"]


def write_imagenet(root, train_per_class=4, val_per_class=2, size=32):
    """ROOT/images/{train,val}/<wnid>/*.JPEG: random images whose mean colour depends on the class."""
    rng = np.random.RandomState(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, wnid in enumerate(IMAGENET_CLASSES):
            folder = os.path.join(root, "images", split, wnid)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                pixels = rng.randint(0, 128, (size, size, 3)) + 60 * c
                Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{wnid}_{split}_{i}.JPEG"),
                                                              quality=95)
    return root


def assert_same_tree(a, b, where=""):
    """Nested dicts / lists of tensors and numbers (checkpoints, optimizer states) are exactly equal."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def restore_process_state():
    """Runs each test with one torch thread, and puts back what a tool run in-process changes process-wide
    (root logger handlers, deterministic algorithms, thread count) so that tests do not leak into each other."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # much faster than two threads on a shared two-core machine, for tiny models
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_num_threads(threads)


@pytest.fixture
def kit():
    """The helpers above, as one namespace."""
    return types.SimpleNamespace(
        REPO=REPO, TOOLS=TOOLS, FASHION_CFG=FASHION_CFG, CIFAR_CFG=CIFAR_CFG, IMAGENET_CFG=IMAGENET_CFG,
        TINY_MODEL=list(TINY_MODEL), IMAGENET_CLASSES=list(IMAGENET_CLASSES), TRAIN_LINE=TRAIN_LINE,
        TEST_LINE=TEST_LINE, load_tool=load_tool, call_tool=call_tool, run_subprocess=run_subprocess,
        free_port=free_port, log_files=log_files, read_log=read_log, test_lines=parse_test_lines,
        train_lines=parse_train_lines, write_fashion_mnist=write_fashion_mnist, write_cifar=write_cifar,
        write_imagenet=write_imagenet)


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """The fixture files cannot match torchvision's CIFAR-10 checksums: bypass the check in this test only."""
    import torchvision

    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)  # meta file
