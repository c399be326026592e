"""The shipped Cityscapes yamls train with the original's effective learning rate, step for step.

The numbers come from running the original segmentation training loop itself (tests/data/original_seg_oracle.json,
recorded by tests/data/record_original_seg.py; see tests/data/README_seg.md).
"""
import json
import os

import pytest
import torch
from torch import nn

from mdeq.config import check_config, load_config
from mdeq.core.optim import build_scheduler, original_epoch_iters, poly_factor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with open(os.path.join(ROOT, "tests", "data", "original_seg_oracle.json")) as _fh:
    ORACLE = json.load(_fh)["lr"]
YAMLS = ("seg_mdeq_SMALL", "seg_mdeq_LARGE", "seg_mdeq_XL")


def _cfg(name):
    return check_config(load_config(os.path.join(ROOT, "experiments", "cityscapes", name + ".yaml")))


def _gpus(cfg):
    return len(cfg.GPUS) if not isinstance(cfg.GPUS, str) else len(eval(cfg.GPUS))


@pytest.mark.parametrize("name", YAMLS)
def test_shipped_yaml_lr_at_25_50_75_percent_equals_the_original(name):
    cfg = _cfg(name)
    rec = ORACLE[name]
    assert cfg.TRAIN.LR_SCHEDULER == "poly"
    assert cfg.TRAIN.LR == rec["base_lr"] and cfg.TRAIN.END_EPOCH == rec["end_epoch"]
    global_batch = cfg.TRAIN.BATCH_SIZE_PER_GPU * _gpus(cfg)
    epoch_iters = original_epoch_iters(rec["num_images"], global_batch)
    assert epoch_iters == rec["epoch_iters"]  # 247 (3 x 4 images a step) or 185 (2 x 8)
    spe = rec["loader_len"]  # the steps each epoch really ran: 248 or 186
    total = spe * cfg.TRAIN.END_EPOCH
    assert total == rec["total_steps"]
    for q, value in rec["quarters"].items():
        step = int(q) * total // 4
        assert cfg.TRAIN.LR * poly_factor(step, spe, epoch_iters, cfg.TRAIN.END_EPOCH) == pytest.approx(
            value, rel=1e-12)
    for step, value in rec["lr_at"].items():  # first steps, epoch boundaries, the last steps
        got = cfg.TRAIN.LR * poly_factor(int(step), spe, epoch_iters, cfg.TRAIN.END_EPOCH)
        assert got == pytest.approx(value, rel=1e-12, abs=1e-15), step


def test_scheduler_reproduces_every_step_of_a_tiny_original_run():
    """11 images, 2 per process on 2 processes: 3 steps an epoch, but the original counts int(11 / 4) = 2."""
    rec = ORACLE["tiny"]
    cfg = load_config(None, ["TRAIN.LR_SCHEDULER", "poly", "TRAIN.LR", str(rec["base_lr"]),
                             "TRAIN.END_EPOCH", str(rec["end_epoch"])])
    param = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=cfg.TRAIN.LR)
    iters = original_epoch_iters(rec["num_images"], rec["batch_per_gpu"] * rec["gpus"])
    assert iters == rec["epoch_iters"] == 2
    sched = build_scheduler(cfg, opt, rec["loader_len"], epoch_iters=iters)
    used = []
    for _ in range(rec["total_steps"]):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert used == pytest.approx(rec["lr"], rel=1e-12)
    # the first two steps both use the base rate; the index repeats at each epoch boundary
    assert used[0] == used[1] == rec["base_lr"] and used[3] == used[4]


def test_poly_without_original_epoch_iters_is_the_plain_lagged_rule():
    cfg = load_config(None, ["TRAIN.LR_SCHEDULER", "poly", "TRAIN.LR", "1.0", "TRAIN.END_EPOCH", "2"])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(cfg, opt, 5)
    used = []
    for _ in range(10):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [1.0] + [(1 - k / 10) ** 0.9 for k in range(9)]
    assert used == pytest.approx(expected, rel=1e-12)
    assert poly_factor(10 ** 6, 5, 5, 2) == 0.0  # past the end: 0, never a complex number
