"""End to end on the tiny Cityscapes fixture: seg_train.py (files, resume, extra phase), seg_test.py (mIoU against
numpy on the label-id maps it writes, test-split submission files, two processes), extract_state_dict.py."""
import csv
import json
import os
import pathlib
import pickle
import re
import socket
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from mdeq.config import check_config, load_config
from mdeq.datasets import convert_label
from mdeq.models import get_cls_net, get_seg_net
from mdeq.utils.state_dict import load_pretrained
from original_format import spec, write_original_cls

from helpers.cityscapes import make_cityscapes_fixture
from helpers.kit import load_tool
from helpers.tiny import SEG_RUN

ROOT = pathlib.Path(__file__).resolve().parents[2]
CFG = str(ROOT / "experiments" / "cityscapes" / "seg_mdeq_SMALL.yaml")
TINY = list(SEG_RUN)
NUM_CLASSES = 19


def _tool(name):
    return load_tool(name)


def _last_value(text, key):
    values = re.findall(rf"^{re.escape(key)}: ([0-9.eE+-]+)$", text, flags=re.M)
    assert values, f"no '{key}: X' line in the output:\n{text[-2000:]}"
    return float(values[-1])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("seg_tools")
    root = str(base / "data")
    written = make_cityscapes_fixture(root)
    opts = TINY + ["DATASET.ROOT", root, "OUTPUT_DIR", str(base / "output"), "LOG_DIR", str(base / "log")]
    return {"base": base, "root": root, "written": written, "opts": opts,
            "out": base / "output" / "cityscapes" / "seg_mdeq_SMALL"}


@pytest.fixture(scope="module")
def trained(workspace):
    """Trains one epoch, then resumes to run one more main epoch and one extra-phase epoch."""
    train = _tool("seg_train")
    first = train.main(["--cfg", CFG] + workspace["opts"] + ["TRAIN.END_EPOCH", "1"])
    ckpt_first = torch.load(workspace["out"] / "checkpoint.pth.tar", weights_only=True)
    second = train.main(["--cfg", CFG] + workspace["opts"] + [
        "TRAIN.END_EPOCH", "2", "TRAIN.EXTRA_EPOCH", "1", "DATASET.EXTRA_TRAIN_SET", "list/cityscapes/train.lst",
        "TRAIN.EXTRA_LR", "0.002"])
    return {"codes": (first, second), "ckpt_first": ckpt_first}


def test_seg_train_writes_checkpoints_and_resumes_into_the_extra_phase(workspace, trained, capsys):
    assert trained["codes"] == (0, 0)
    out = workspace["out"]
    for name in ("checkpoint.pth.tar", "best.pth", "final_state.pth"):
        assert (out / name).is_file(), name
    first = trained["ckpt_first"]
    assert first["epoch"] == 1 and first["step"] == 1 and first["phase"] == "main"
    assert {"state_dict", "optimizer", "lr_scheduler", "best_mIoU", "rng", "config"} <= set(first)
    ckpt = torch.load(out / "checkpoint.pth.tar", weights_only=True)
    # resumed at epoch 1: one more main epoch and one extra epoch, one step each (3 images, batch 2)
    assert ckpt["epoch"] == 3 and ckpt["step"] == 3 and ckpt["phase"] == "extra"
    assert ckpt["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(0.002)
    assert 0.0 <= ckpt["best_mIoU"] <= 1.0
    final = torch.load(out / "final_state.pth", weights_only=True)
    assert set(final) == set(ckpt["state_dict"])
    assert all(torch.equal(final[k], ckpt["state_dict"][k]) for k in final)
    logs = "".join(p.read_text() for p in (workspace["base"] / "log").rglob("*_train.log"))
    assert "resumed from" in logs and "extra phase" in logs and "Per-class IoU" in logs and "sidewalk" in logs
    assert "unrolled" in logs and "equilibrium" in logs and "Fwd nstep" in logs
    # one metrics row per epoch, appended across the resume, with segmentation's columns and the solver's
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and [r["phase"] for r in rows][-1] == "equilibrium"
    assert all(0.0 <= float(r["valid_mIoU"]) <= 1.0 and r["valid_top1"] == "" for r in rows)
    assert float(rows[-1]["valid_forward_nstep"]) > 0 and float(rows[-1]["forward_nstep"]) > 0
    assert int(rows[-1]["f_calls_forward"]) > int(rows[0]["f_calls_forward"]) > 0
    results = json.loads((out / "results.json").read_text())
    assert results["metric"] == "mIoU" and results["best"] == pytest.approx(ckpt["best_mIoU"])


def _numpy_miou(pred_dir, val_items):
    conf = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for item in val_items:
        base = os.path.basename(item["image"])[:-len(".png")]
        ids = cv2.imread(os.path.join(pred_dir, "label_ids", base + ".png"), cv2.IMREAD_UNCHANGED)
        assert ids is not None and ids.dtype == np.uint8 and ids.shape == item["raw"].shape
        pred = convert_label(ids, ignore_label=255)
        gt = convert_label(item["raw"], ignore_label=255)
        assert np.all(pred != 255)  # every predicted id maps back to a train id
        valid = gt != 255
        np.add.at(conf, (gt[valid], pred[valid]), 1)
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    return float(np.mean(tp / np.maximum(union, 1.0)))


def test_seg_test_miou_equals_numpy_on_the_label_id_maps_it_wrote(workspace, trained, capsys, tmp_path):
    capsys.readouterr()
    pred_dir = tmp_path / "pred"
    code = _tool("seg_test").main(["--cfg", CFG, "--testModel", str(workspace["out"] / "final_state.pth")]
                                  + workspace["opts"] + ["TEST.SAVE_PREDICTIONS", "True",
                                                         "TEST.OUTPUT_DIR", str(pred_dir)])
    text = capsys.readouterr().out
    assert code == 0
    assert text.strip().splitlines()[-1].startswith("mIoU: ")
    assert "pixel accuracy: " in text and "Per-class IoU" in text and "traffic light" in text
    miou = _last_value(text, "mIoU")
    assert miou == pytest.approx(_numpy_miou(str(pred_dir), workspace["written"]["val"]), abs=2e-6)
    for item in workspace["written"]["val"]:
        base = os.path.basename(item["image"])
        for sub in ("color", "overlay"):
            img = cv2.imread(str(pred_dir / sub / base))
            assert img is not None and img.shape == item["rgb"].shape
    workspace["single_miou"] = miou


def test_seg_test_on_the_test_split_writes_benchmark_label_id_maps(workspace, trained, capsys, tmp_path):
    pred_dir = tmp_path / "test_pred"
    code = _tool("seg_test").main(["--cfg", CFG, "--testModel", str(workspace["out"] / "final_state.pth")]
                                  + workspace["opts"] + ["DATASET.TEST_SET", "list/cityscapes/test.lst",
                                                         "TEST.OUTPUT_DIR", str(pred_dir)])
    text = capsys.readouterr().out
    assert code == 0 and "mIoU:" not in text and f"predictions: {pred_dir}" in text
    valid_ids = {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}
    files = sorted(os.listdir(pred_dir / "label_ids"))
    assert files == sorted(os.path.basename(i["image"]) for i in workspace["written"]["test"])
    for item in workspace["written"]["test"]:
        ids = cv2.imread(str(pred_dir / "label_ids" / os.path.basename(item["image"])), cv2.IMREAD_UNCHANGED)
        assert ids.dtype == np.uint8 and ids.shape == item["rgb"].shape[:2]
        assert set(np.unique(ids).tolist()) <= valid_ids
    assert not (pred_dir / "color").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_same_miou_as_one(workspace, trained, tmp_path):
    if "single_miou" not in workspace:
        pytest.skip("needs the single-process result of test_seg_test_miou_equals_numpy_on_the_label_id_maps")
    pred_dir = tmp_path / "pred2"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(ROOT / "tools" / "seg_test.py"), "--cfg", CFG, "--testModel",
           str(workspace["out"] / "final_state.pth")] + workspace["opts"] + [
           "TEST.SAVE_PREDICTIONS", "True", "TEST.OUTPUT_DIR", str(pred_dir)]
    proc = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert len(re.findall(r"^mIoU: ", proc.stdout, flags=re.M)) == 1  # printed by rank 0 only
    assert _last_value(proc.stdout, "mIoU") == pytest.approx(workspace["single_miou"], abs=1e-6)
    # each process wrote the images of its own shard: together, every validation image once
    assert len(os.listdir(pred_dir / "label_ids")) == len(workspace["written"]["val"])


def test_seg_test_reports_a_missing_model_in_one_line(workspace, capsys, tmp_path):
    code = _tool("seg_test").main(["--cfg", CFG, "--testModel", str(tmp_path / "nope.pth")] + workspace["opts"])
    err = capsys.readouterr().err
    assert code == 2 and "nope.pth" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------- extract_state_dict.py
def _cls_cfg():
    return check_config(load_config(str(ROOT / "experiments" / "cifar" / "cls_mdeq_TINY.yaml"), []))


def test_extract_state_dict_round_trip_from_a_training_checkpoint(tmp_path, capsys):
    cfg = _cls_cfg()
    torch.manual_seed(0)
    model = get_cls_net(cfg)
    sd = model.state_dict()
    ckpt = {"epoch": 7, "step": 70, "state_dict": {"module." + k: v for k, v in sd.items()},
            "optimizer": {"state": {}, "param_groups": []}, "perf": 12.5}
    src = tmp_path / "checkpoint.pth.tar"
    torch.save(ckpt, src)
    tool = _tool("extract_state_dict")

    out = tmp_path / "full.pth"
    assert tool.main([str(src), str(out)]) == 0
    got = torch.load(out, weights_only=True)
    assert list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert f"wrote {len(sd)} tensors" in capsys.readouterr().out

    trunk = tmp_path / "trunk.pth"
    assert tool.main([str(src), str(trunk), "--drop-head"]) == 0
    got = torch.load(trunk, weights_only=True)
    heads = {"incre_modules", "downsamp_modules", "final_layer", "classifier"}
    assert not {k.split(".")[0] for k in got} & heads
    assert set(got) == {k for k in sd if k.split(".")[0] not in heads}
    # the trunk is what MODEL.PRETRAINED gives a segmentation model of the same size: nothing dropped
    seg = get_seg_net(cfg)
    report = load_pretrained(seg, str(trunk))
    assert report["dropped"] == [] and report["misshapen"] == []
    assert set(report["loaded"]) == set(got)
    assert all(torch.equal(seg.state_dict()[k], got[k]) for k in got)


def test_extract_state_dict_from_an_original_pkl_and_refuses_code(tmp_path, capsys):
    cfg = _cls_cfg()
    torch.manual_seed(1)
    model = get_cls_net(cfg)
    pkl = write_original_cls(model, spec("cifar__cls_mdeq_TINY"), str(tmp_path / "orig.pkl"))
    out = tmp_path / "clean.pth"
    tool = _tool("extract_state_dict")
    assert tool.main([pkl, str(out)]) == 0
    got = torch.load(out, weights_only=True)
    sd = model.state_dict()
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    capsys.readouterr()

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo should-not-run",))

    bad = tmp_path / "bad.pkl"
    with open(bad, "wb") as fh:
        pickle.dump({"state_dict": Boom()}, fh, protocol=2)
    assert tool.main([str(bad), str(tmp_path / "x.pth")]) == 2
    captured = capsys.readouterr()
    assert "should-not-run" not in captured.out and "error:" in captured.err
    assert not (tmp_path / "x.pth").exists()
