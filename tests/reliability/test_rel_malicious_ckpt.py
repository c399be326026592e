"""Malicious checkpoints: a file whose unpickling would run code is refused by every loader, and the code never
runs.

The payload is an object whose ``__reduce__`` tells the unpickler to call ``open(marker, "w")``: if any loader
unpickled it with the full pickle machinery, the marker file would exist afterwards. It is hidden inside files
that otherwise look right (a real state dict, a real training checkpoint), written by torch.save (zip) and by
plain pickle.dump with protocols 2 and 4 (the original project's .pkl files are pickles). Loaders: cls_valid
--testModel, seg_test TEST.MODEL_FILE, MODEL.PRETRAINED and TRAIN.MODEL_FILE of both trainers, resuming
(TRAIN.RESUME with a poisoned checkpoint.pth.tar, TRAIN.CHECKPOINT, AUTO_RESUME) and
pretrained_models/extract_state_dict.py.
"""
import os
import pickle
import shutil

import pytest
import torch

from mdeq.config import load_config
from mdeq.models import get_cls_net, get_seg_net


class Payload:
    """Unpickling this object creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def poison(obj, path, marker, writer):
    """Writes obj with the payload hidden in it (inside the weights' container and next to them)."""
    if isinstance(obj, dict) and "state_dict" in obj:
        bad = dict(obj, extra=Payload(marker))
    else:
        bad = dict(obj)
        bad["zz_trailing.weight"] = Payload(marker)
    if writer == "torch":
        torch.save(bad, path)
    else:  # pickle2 / pickle4: the protocol of plain pickle.dump
        with open(path, "wb") as fh:
            pickle.dump(bad, fh, protocol=int(writer[-1]))
    return path


@pytest.fixture(params=["torch", "pickle2", "pickle4"])
def env(request, kit, rel, tmp_path):
    writer = request.param
    marker = str(tmp_path / "PAYLOAD_RAN")
    fm = kit.write_fashion_mnist(str(tmp_path / "fmnist"), n_train=16, n_test=4)
    cs = str(tmp_path / "cityscapes")
    rel.make_cityscapes(cs)
    out, log = str(tmp_path / "output"), str(tmp_path / "log")
    cls_opts = kit.TINY_MODEL + ["DATASET.ROOT", fm, "OUTPUT_DIR", out, "LOG_DIR", log, "TRAIN.BATCH_SIZE_PER_GPU",
                                 "4", "TEST.BATCH_SIZE_PER_GPU", "4", "TRAIN.END_EPOCH", "1"]
    seg_opts = rel.SEG_TINY + ["DATASET.ROOT", cs, "OUTPUT_DIR", out, "LOG_DIR", log, "TRAIN.END_EPOCH", "1",
                               "TRAIN.RESUME", "False"]
    cls_sd = get_cls_net(load_config(kit.FASHION_CFG, cls_opts), in_channels=1).state_dict()
    seg_sd = get_seg_net(load_config(rel.SEG_CFG, seg_opts)).state_dict()
    files = {
        "cls_weights": poison(cls_sd, str(tmp_path / "cls_weights.pkl"), marker, writer),
        "seg_weights": poison(seg_sd, str(tmp_path / "seg_weights.pth"), marker, writer),
        "cls_ckpt": poison({"epoch": 1, "step": 4, "state_dict": cls_sd}, str(tmp_path / "cls_ckpt.pth.tar"),
                           marker, writer),
        "seg_ckpt": poison({"epoch": 1, "step": 8, "state_dict": seg_sd}, str(tmp_path / "seg_ckpt.pth.tar"),
                           marker, writer),
    }
    return {"tmp": tmp_path, "marker": marker, "out": out, "files": files, "writer": writer,
            "cfg": {"cls": kit.FASHION_CFG, "seg": rel.SEG_CFG}, "opts": {"cls": cls_opts, "seg": seg_opts}}


def refused(kit, rel, env, capsys, tool, argv, path, *needles):
    """The tool refuses path: exit code 2, the message names the file and why, the payload did not run, the file
    itself and the output folder are unchanged."""
    with open(path, "rb") as fh:
        data = fh.read()
    before = rel.fingerprint(env["out"])
    code = kit.call_tool(tool, argv)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert not os.path.exists(env["marker"]), f"{tool} ran code from {path}"
    assert err.startswith("error: ") and "Traceback" not in err, err[-3000:]
    for needle in ("refused to load", path, "could run code", "plain state dict") + needles:
        assert needle in err, (needle, err)
    with open(path, "rb") as fh:
        assert fh.read() == data, "the refused file was changed"
    assert rel.fingerprint(env["out"]) == before
    assert rel.partial_files(env["out"]) == []


def test_evaluation_tools_refuse(kit, rel, env, capsys):
    f = env["files"]
    refused(kit, rel, env, capsys, "cls_valid", ["--cfg", env["cfg"]["cls"], "--testModel", f["cls_weights"]]
            + env["opts"]["cls"], f["cls_weights"])
    refused(kit, rel, env, capsys, "seg_test", ["--cfg", env["cfg"]["seg"]] + env["opts"]["seg"]
            + ["TEST.MODEL_FILE", f["seg_weights"]], f["seg_weights"])


@pytest.mark.parametrize("key", ["MODEL.PRETRAINED", "TRAIN.MODEL_FILE"])
def test_training_initialisation_refuses(kit, rel, env, capsys, key):
    f = env["files"]
    refused(kit, rel, env, capsys, "cls_train", ["--cfg", env["cfg"]["cls"]] + env["opts"]["cls"]
            + [key, f["cls_weights"]], f["cls_weights"])
    refused(kit, rel, env, capsys, "seg_train", ["--cfg", env["cfg"]["seg"]] + env["opts"]["seg"]
            + [key, f["seg_weights"]], f["seg_weights"])


@pytest.mark.parametrize("tool", ["cls_train", "seg_train"])
def test_resume_refuses_a_poisoned_checkpoint(kit, rel, env, capsys, tool):
    kind = tool[:3]
    folder = os.path.join(env["out"], "fashion_mnist/cls_mdeq_quick" if kind == "cls" else "cityscapes/seg_mdeq_SMALL")
    os.makedirs(folder)
    default = os.path.join(folder, "checkpoint.pth.tar")
    shutil.copyfile(env["files"][f"{kind}_ckpt"], default)
    base = ["--cfg", env["cfg"][kind]] + env["opts"][kind]
    refused(kit, rel, env, capsys, tool, base + ["TRAIN.RESUME", "True"], default, f"cannot resume from {default}",
            "left as it is")
    refused(kit, rel, env, capsys, tool, base + ["TRAIN.CHECKPOINT", env["files"][f"{kind}_ckpt"]],
            env["files"][f"{kind}_ckpt"], "cannot resume from")


def test_auto_resume_skips_a_poisoned_checkpoint_without_running_it(kit, rel, env, capsys):
    """AUTO_RESUME reads every candidate safely: the poisoned newest one is skipped with a warning, and training
    goes on from the readable older one."""
    folder = os.path.join(env["out"], "fashion_mnist", "cls_mdeq_quick")
    base = ["--cfg", env["cfg"]["cls"]] + env["opts"]["cls"]
    assert kit.call_tool("cls_train", base) == 0  # a real epoch-1 checkpoint
    shutil.copyfile(os.path.join(folder, "checkpoint.pth.tar"), os.path.join(folder, "checkpoint_prev.pth.tar"))
    poisoned = os.path.join(folder, "checkpoint.pth.tar")
    ckpt = torch.load(poisoned, weights_only=True)
    poison(dict(ckpt, epoch=5, step=99), poisoned, env["marker"], "torch")
    with open(poisoned, "rb") as fh:
        poisoned_bytes = fh.read()
    capsys.readouterr()
    assert kit.call_tool("cls_train", base + ["AUTO_RESUME", "True", "TRAIN.END_EPOCH", "2"]) == 0
    out = capsys.readouterr().out
    assert not os.path.exists(env["marker"])
    assert f"skipping unusable checkpoint {poisoned}" in out and "refused to load" in out
    assert f"resumed from {os.path.join(folder, 'checkpoint_prev.pth.tar')}: epoch 1" in out
    # the poisoned file is kept, unread, out of the way; the run wrote its own epoch-2 checkpoint
    with open(poisoned + ".unusable", "rb") as fh:
        assert fh.read() == poisoned_bytes
    assert torch.load(poisoned, weights_only=True)["epoch"] == 2
    assert torch.load(os.path.join(folder, "checkpoint_prev.pth.tar"), weights_only=True)["epoch"] == 1


def test_extract_state_dict_refuses(kit, rel, env, capsys):
    tool = kit.load_tool(os.path.join("..", "pretrained_models", "extract_state_dict"))
    for name in ("cls_weights", "cls_ckpt"):
        src = env["files"][name]
        dst = str(env["tmp"] / f"extracted_{name}.pth")
        assert tool.main([src, dst]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        assert "refused to load" in err and src in err and "could run code" in err
        assert not os.path.exists(env["marker"]) and not os.path.exists(dst)
        assert [p for p in os.listdir(env["tmp"]) if p.endswith(".tmp")] == []


def test_the_payload_runs_when_unpickled_unsafely(env):
    """The control: the same file does run its code when unpickled without the weights-only restriction, so the
    tests above would see it run."""
    path = env["files"]["cls_weights"]
    if env["writer"] == "torch":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as fh:
            pickle.load(fh)
    assert os.path.exists(env["marker"])
