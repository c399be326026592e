"""Bad input through the real tools: every case ends in one ``error: ...`` message (exit code 2) that names the
problem and the fix, and leaves the output folder exactly as it was (same files, same bytes, no partial files).

Cases: a yaml that does not parse, a misspelled key, a value of the wrong type, branch lists of different lengths,
a dataset root that does not exist or holds no images, unreadable image / label / IDX / CIFAR files (named in the
error, or skipped with a warning under DATASET.SKIP_BAD_FILES, also from a DataLoader worker process), checkpoints
of another architecture, truncated, or not checkpoints at all, a missing --testModel, bad batch sizes, and the same
from the command line (exit code 2, no traceback).

Batch size: TRAIN.BATCH_SIZE_PER_GPU is per process, so any number of processes "divides" it (the global batch is
BATCH_SIZE_PER_GPU x processes). What can go wrong is a size below 1, or a training split too small to give each
process one batch of two samples; both are refused with a message.
"""
import glob
import os

import numpy as np
import pytest
import torch

from mdeq.config import load_config
from mdeq.models import get_cls_net, get_seg_net

CLS_TOOLS = ["cls_train", "cls_valid"]
SEG_TOOLS = ["seg_train", "seg_test"]


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture
def ws(kit, rel, tmp_path):
    """Data in every format, a model file for each tool, and output folders holding an earlier run's files."""
    fm = kit.write_fashion_mnist(str(tmp_path / "fmnist"), n_train=16, n_test=4)
    out, log = str(tmp_path / "output"), str(tmp_path / "log")
    cls_opts = kit.TINY_MODEL + ["DATASET.ROOT", fm, "OUTPUT_DIR", out, "LOG_DIR", log, "TRAIN.BATCH_SIZE_PER_GPU",
                                 "4", "TEST.BATCH_SIZE_PER_GPU", "4", "TRAIN.END_EPOCH", "1",
                                 "TRAIN.OVERWRITE", "True"]  # a failed run must leave the earlier files as they are
    cls_model = str(tmp_path / "cls_model.pth.tar")
    torch.save(get_cls_net(load_config(kit.FASHION_CFG, cls_opts), in_channels=1).state_dict(), cls_model)
    cs = str(tmp_path / "cityscapes")
    rel.make_cityscapes(cs)
    seg_opts = rel.SEG_TINY + ["DATASET.ROOT", cs, "OUTPUT_DIR", out, "LOG_DIR", log, "TRAIN.END_EPOCH", "1",
                                "TRAIN.RESUME", "False", "TRAIN.OVERWRITE", "True"]
    seg_model = str(tmp_path / "seg_model.pth")
    torch.save(get_seg_net(load_config(rel.SEG_CFG, seg_opts)).state_dict(), seg_model)
    # what an earlier run left in the output folders: these bytes must survive every failed run
    for sub in ("fashion_mnist/cls_mdeq_quick", "cityscapes/seg_mdeq_SMALL", "imagenet/cls_mdeq_SMALL",
                "cifar10/cls_mdeq_TINY"):
        folder = os.path.join(out, sub)
        os.makedirs(folder)
        for name in ("checkpoint.pth.tar", "final_state.pth.tar"):
            torch.save({"epoch": 3, "step": 30, "state_dict": {"w": torch.arange(4.0)}}, os.path.join(folder, name))
    return {"tmp": tmp_path, "fm": fm, "cs": cs, "out": out, "log": log, "cls_model": cls_model,
            "seg_model": seg_model, "cfg": {"cls": kit.FASHION_CFG, "seg": rel.SEG_CFG},
            "opts": {"cls": cls_opts, "seg": seg_opts}}


def argv_for(ws, tool, cfg=None, extra=()):
    kind = tool[:3]
    argv = ["--cfg", cfg or ws["cfg"][kind]]
    if tool == "cls_valid":
        argv += ["--testModel", ws["cls_model"]]
    if tool == "seg_test":
        argv += ["--testModel", ws["seg_model"]]
    return argv + ws["opts"][kind] + list(extra)


def fails_cleanly(kit, rel, ws, capsys, tool, argv, *needles):
    """Runs the tool in-process: exit code 2, one ``error:`` message holding every needle, no traceback, and the
    output folder unchanged (same files and bytes, no partial files). Returns the message."""
    before = rel.fingerprint(ws["out"])
    code = kit.call_tool(tool, argv)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert err.startswith("error: ") and err.count("error: ") == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert needle in err, (needle, err[-3000:])
    assert rel.fingerprint(ws["out"]) == before, "a failed run changed the output folder"
    assert rel.partial_files(ws["out"]) == []
    return err


# ----------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("tool", CLS_TOOLS + SEG_TOOLS)
def test_yaml_that_does_not_parse(kit, rel, ws, capsys, tool):
    bad = ws["tmp"] / "broken.yaml"
    bad.write_text("MODEL:\n  NAME: mdeq\n   NUM_LAYERS: [4\n")
    fails_cleanly(kit, rel, ws, capsys, tool, argv_for(ws, tool, cfg=str(bad)), str(bad), "not valid YAML",
                  "line 3", "indentation")


@pytest.mark.parametrize("tool", CLS_TOOLS + SEG_TOOLS)
def test_misspelled_key_in_the_yaml_and_on_the_command_line(kit, rel, ws, capsys, tool):
    typo = ws["tmp"] / "typo.yaml"
    typo.write_text("TRAIN:\n  LR_SCHEDULR: cosine\n")
    fails_cleanly(kit, rel, ws, capsys, tool, argv_for(ws, tool, cfg=str(typo)), str(typo),
                  "unknown config key TRAIN.LR_SCHEDULR", "Did you mean TRAIN.LR_SCHEDULER")
    fails_cleanly(kit, rel, ws, capsys, tool, argv_for(ws, tool, extra=["DEQ.F_THRESH", "5"]),
                  "unknown config key DEQ.F_THRESH", "Did you mean DEQ.F_THRES")


@pytest.mark.parametrize("tool", CLS_TOOLS + SEG_TOOLS)
def test_value_of_the_wrong_type(kit, rel, ws, capsys, tool):
    wrong = ws["tmp"] / "wrong_type.yaml"
    wrong.write_text("TRAIN:\n  END_EPOCH: three\n")
    fails_cleanly(kit, rel, ws, capsys, tool, argv_for(ws, tool, cfg=str(wrong)), "TRAIN.END_EPOCH",
                  "expected a value of type int", "'three'", "Fix the value")
    fails_cleanly(kit, rel, ws, capsys, tool, argv_for(ws, tool, extra=["TRAIN.LR", "fast"]), "TRAIN.LR",
                  "expected a value of type float")


@pytest.mark.parametrize("tool", CLS_TOOLS + SEG_TOOLS)
def test_branch_lists_of_inconsistent_length(kit, rel, ws, capsys, tool):
    fails_cleanly(kit, rel, ws, capsys, tool, argv_for(ws, tool, extra=[
        "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8, 16, 32]"]), "NUM_BRANCHES is 2",
        "NUM_CHANNELS has 3 entries", "one entry per branch")


@pytest.mark.parametrize("value", ["0", "-4"])
def test_batch_size_below_one(kit, rel, ws, capsys, value):
    for tool, key in (("cls_train", "TRAIN.BATCH_SIZE_PER_GPU"), ("cls_valid", "TEST.BATCH_SIZE_PER_GPU"),
                      ("seg_train", "TRAIN.BATCH_SIZE_PER_GPU"), ("seg_test", "TEST.BATCH_SIZE_PER_GPU")):
        fails_cleanly(kit, rel, ws, capsys, tool, argv_for(ws, tool, extra=[key, value]), key,
                      f"must be at least 1, got {value}")


def test_training_split_too_small_for_one_batch_per_process(kit, rel, ws, capsys):
    # 16 images x PERCENT 0.07 = 1 image: a batch of one cannot train BatchNorm, so no step would run
    fails_cleanly(kit, rel, ws, capsys, "cls_train",
                  argv_for(ws, "cls_train", extra=["PERCENT", "0.07", "TRAIN.PERCENT_MODE", "fixed"]),
                  "training would run no step", "1 training sample(s) (PERCENT 0.07) over 1 process(es)",
                  "global batch 4 = 1 process(es) x 4 samples per step")
    # the original's way: 7 % of the 4 batches of a shuffled epoch is no batch at all
    fails_cleanly(kit, rel, ws, capsys, "cls_train", argv_for(ws, "cls_train", extra=["PERCENT", "0.07"]),
                  "training would run no step", "PERCENT 0.07 of the 4 batches of an epoch is 0 batches")


# ------------------------------------------------------------------------------------------------- datasets
@pytest.mark.parametrize("tool", CLS_TOOLS)
def test_dataset_root_that_does_not_exist(kit, rel, ws, capsys, tool):
    root = str(ws["tmp"] / "no_such_root")
    argv = argv_for(ws, tool, cfg=kit.CIFAR_CFG, extra=["DATASET.ROOT", root, "DATASET.DOWNLOAD", "False",
                                                          "MODEL.IMAGE_SIZE", "[32, 32]"])
    if tool == "cls_valid":  # a CIFAR-shaped model, so that the data are the first problem met
        model = str(ws["tmp"] / "cifar_model.pth")
        torch.save(get_cls_net(load_config(kit.CIFAR_CFG, kit.TINY_MODEL)).state_dict(), model)
        argv[argv.index("--testModel") + 1] = model
    fails_cleanly(kit, rel, ws, capsys, tool, argv, "CIFAR-10 not found", root, "does not exist",
                  "DATASET.DOWNLOAD True")


def test_segmentation_root_that_does_not_exist(kit, rel, ws, capsys):
    root = str(ws["tmp"] / "no_cityscapes")
    for tool in SEG_TOOLS:
        fails_cleanly(kit, rel, ws, capsys, tool, argv_for(ws, tool, extra=["DATASET.ROOT", root]),
                      "list file not found", root)


@pytest.mark.parametrize("layout", ["no class folders", "empty class folder"])
def test_image_folder_root_that_holds_no_images(kit, rel, ws, capsys, layout):
    root = ws["tmp"] / "imagenet_empty"
    (root / "images" / "train").mkdir(parents=True)
    if layout == "empty class folder":
        (root / "images" / "train" / "n01440764").mkdir()
    needle = "holds no class folders" if layout == "no class folders" else "a class folder holds no image files"
    fails_cleanly(kit, rel, ws, capsys, "cls_train", argv_for(ws, "cls_train", cfg=kit.IMAGENET_CFG, extra=[
        "DATASET.ROOT", str(root), "MODEL.NUM_CLASSES", "3", "MODEL.IMAGE_SIZE", "[32, 32]",
        "TRAIN.RESUME", "False"]), needle, str(root / "images" / "train"), "data/README.md")


@pytest.mark.parametrize("workers", ["0", "1"])
def test_unreadable_image_is_named_or_skipped(kit, rel, ws, capsys, workers):
    root = kit.write_imagenet(str(ws["tmp"] / "imagenet"), train_per_class=2, val_per_class=1)
    bad = sorted(glob.glob(os.path.join(root, "images", "train", "*", "*.JPEG")))[1]
    with open(bad, "wb") as fh:
        fh.write(b"\xff\xd8 this is not a JPEG")
    argv = argv_for(ws, "cls_train", cfg=kit.IMAGENET_CFG, extra=[
        "DATASET.ROOT", root, "MODEL.NUM_CLASSES", "3", "MODEL.IMAGE_SIZE", "[32, 32]", "TRAIN.RESUME", "False",
        "TRAIN.BATCH_SIZE_PER_GPU", "2", "WORKERS", workers])
    # from a worker process too: the message is the worker's error line, not its traceback
    fails_cleanly(kit, rel, ws, capsys, "cls_train", argv, f"cannot read {bad}", "DATASET.SKIP_BAD_FILES True")
    assert kit.call_tool("cls_train", argv + ["DATASET.SKIP_BAD_FILES", "True"]) == 0
    capsys.readouterr()
    logs = kit.log_files(os.path.join(ws["log"], "imagenet", "cls_mdeq_SMALL"), "train")
    assert any(f"skipping unreadable image {bad}" in rel.read(f) for f in logs)  # a worker logs there too


def test_unreadable_segmentation_label_is_named_or_skipped(kit, rel, ws, capsys):
    bad = sorted(glob.glob(os.path.join(ws["cs"], "cityscapes", "gtFine", "train", "*", "*.png")))[0]
    with open(bad, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n truncated")
    argv = argv_for(ws, "seg_train")
    fails_cleanly(kit, rel, ws, capsys, "seg_train", argv, f"cannot read {bad}", "DATASET.SKIP_BAD_FILES True")
    assert kit.call_tool("seg_train", argv + ["DATASET.SKIP_BAD_FILES", "True"]) == 0
    out = capsys.readouterr().out
    assert f"skipping unreadable file {bad}" in out


def test_truncated_idx_and_corrupt_cifar_files(kit, rel, ws, capsys, skip_cifar_md5):
    images = os.path.join(ws["fm"], "train-images-idx3-ubyte")
    with open(images, "rb") as fh:
        data = fh.read()
    with open(images, "wb") as fh:
        fh.write(data[: len(data) // 2])
    fails_cleanly(kit, rel, ws, capsys, "cls_train", argv_for(ws, "cls_train"), images, "truncated",
                  "download it again")
    cifar = kit.write_cifar(str(ws["tmp"] / "cifar"))
    batch = os.path.join(cifar, "cifar-10-batches-py", "data_batch_3")
    with open(batch, "wb") as fh:
        fh.write(b"\x80\x04 not a pickle")
    fails_cleanly(kit, rel, ws, capsys, "cls_train", argv_for(ws, "cls_train", cfg=kit.CIFAR_CFG, extra=[
        "DATASET.ROOT", cifar, "MODEL.IMAGE_SIZE", "[32, 32]"]), "cannot read the CIFAR-10 files",
        "download it again")


# ---------------------------------------------------------------------------------------------- checkpoints
def other_architecture(kit, ws, kind):
    """A valid state dict of a three-branch model (the tools build two branches)."""
    wide = ["MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", "3", "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS", "[1, 1, 1]",
            "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8, 8, 8]", "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", "[4, 8, 8]"]
    path = str(ws["tmp"] / f"three_branches_{kind}.pth")
    cfg = load_config(ws["cfg"][kind], ws["opts"][kind] + wide)
    model = get_cls_net(cfg, in_channels=1) if kind == "cls" else get_seg_net(cfg)
    torch.save(model.state_dict(), path)
    return path


def broken_files(ws):
    folder = ws["tmp"] / "broken"
    folder.mkdir(exist_ok=True)
    with open(ws["cls_model"], "rb") as fh:
        data = fh.read()
    (folder / "truncated.pth.tar").write_bytes(data[: len(data) // 3])
    flipped = bytearray(data)
    for i in range(len(flipped) // 4, len(flipped) // 4 + 4096):
        flipped[i] ^= 0xFF
    (folder / "corrupted.pth.tar").write_bytes(bytes(flipped))
    (folder / "notes.pth.tar").write_text("epoch 3: loss 0.31\n")
    (folder / "empty.pkl").write_bytes(b"")
    np.save(str(folder / "array.npy"), np.zeros(3))
    return {"truncated": (str(folder / "truncated.pth.tar"), "not a readable checkpoint"),
            "corrupted": (str(folder / "corrupted.pth.tar"), "not a readable checkpoint"),
            "text": (str(folder / "notes.pth.tar"), "not a readable checkpoint"),
            "empty": (str(folder / "empty.pkl"), "is empty"),
            "numpy": (str(folder / "array.npy"), "not a readable checkpoint")}


@pytest.mark.parametrize("tool", ["cls_valid", "seg_test"])
def test_checkpoint_of_another_architecture(kit, rel, ws, capsys, tool):
    path = other_architecture(kit, ws, tool[:3])
    argv = argv_for(ws, tool)
    argv[argv.index("--testModel") + 1] = path
    fails_cleanly(kit, rel, ws, capsys, tool, argv, path, "does not fit the model", "another experiment file",
                  "unexpected in the file", "fullstage.branches.2")


def test_checkpoint_of_another_architecture_for_training(kit, rel, ws, capsys):
    path = other_architecture(kit, ws, "cls")
    fails_cleanly(kit, rel, ws, capsys, "cls_train", argv_for(ws, "cls_train", extra=["TRAIN.MODEL_FILE", path]),
                  path, "does not fit the model", "MODEL.PRETRAINED for a partial")


@pytest.mark.parametrize("tool", ["cls_valid", "seg_test"])
def test_truncated_corrupted_and_non_checkpoint_files(kit, rel, ws, capsys, tool):
    for name, (path, needle) in broken_files(ws).items():
        argv = argv_for(ws, tool)
        argv[argv.index("--testModel") + 1] = path
        err = fails_cleanly(kit, rel, ws, capsys, tool, argv, path, needle)
        assert "earlier checkpoint" in err or "does not fit" in err or "holds no model weights" in err, (name, err)


@pytest.mark.parametrize("key", ["TRAIN.MODEL_FILE", "MODEL.PRETRAINED"])
def test_broken_files_as_training_initialisation(kit, rel, ws, capsys, key):
    for tool in ("cls_train", "seg_train"):
        for path, needle in list(broken_files(ws).values())[:3]:
            fails_cleanly(kit, rel, ws, capsys, tool, argv_for(ws, tool, extra=[key, path]), path, needle)


@pytest.mark.parametrize("tool", ["cls_train", "seg_train"])
def test_truncated_checkpoint_to_resume_is_left_alone(kit, rel, ws, capsys, tool):
    folder = os.path.join(ws["out"], "fashion_mnist/cls_mdeq_quick" if tool == "cls_train"
                          else "cityscapes/seg_mdeq_SMALL")
    ckpt = os.path.join(folder, "checkpoint.pth.tar")
    with open(ckpt, "rb") as fh:
        data = fh.read()
    with open(ckpt, "wb") as fh:
        fh.write(data[:100])
    fails_cleanly(kit, rel, ws, capsys, tool, argv_for(ws, tool, extra=["TRAIN.RESUME", "True"]),
                  f"cannot resume from {ckpt}", "not a readable checkpoint", "left as it is",
                  "TRAIN.RESUME False", "AUTO_RESUME True")


@pytest.mark.parametrize("tool", ["cls_valid", "seg_test"])
def test_test_model_that_does_not_exist(kit, rel, ws, capsys, tool):
    missing = str(ws["tmp"] / "nowhere" / "model.pth")
    argv = argv_for(ws, tool)
    argv[argv.index("--testModel") + 1] = missing
    fails_cleanly(kit, rel, ws, capsys, tool, argv, missing, "does not exist", "check the path")


# ----------------------------------------------------------------------------------------- command line
def test_command_line_exit_code_two_and_no_traceback(kit, rel, ws):
    bad = ws["tmp"] / "broken.yaml"
    bad.write_text("TRAIN: [\n")
    before = rel.fingerprint(ws["out"])
    for tool in ("cls_train", "seg_test"):
        code, output = kit.run_subprocess([os.path.join("tools", f"{tool}.py"), "--cfg", str(bad)], timeout=120)
        lines = [line for line in output.splitlines() if line.strip()]
        assert code == 2, output[-3000:]
        assert "Traceback" not in output and lines[-1].startswith("error: ") and str(bad) in lines[-1]
    # an unreadable image met in a DataLoader worker process: still one line, no traceback
    root = kit.write_imagenet(str(ws["tmp"] / "imagenet_cli"), train_per_class=2, val_per_class=1)
    bad_image = sorted(glob.glob(os.path.join(root, "images", "train", "*", "*.JPEG")))[0]
    with open(bad_image, "wb") as fh:
        fh.write(b"GIF89a but not really")
    code, output = kit.run_subprocess([os.path.join("tools", "cls_train.py")] + argv_for(
        ws, "cls_train", cfg=kit.IMAGENET_CFG, extra=["DATASET.ROOT", root, "MODEL.NUM_CLASSES", "3",
                                                      "MODEL.IMAGE_SIZE", "[32, 32]", "TRAIN.RESUME", "False",
                                                      "TRAIN.BATCH_SIZE_PER_GPU", "2", "WORKERS", "1"]),
        timeout=180)
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert lines[-1] == lines[-1].strip() and lines[-1].startswith(f"error: cannot read {bad_image}")
    assert rel.fingerprint(ws["out"]) == before
