"""Exact resume of classification training on the CPU.

Two epochs in one go must give bit-identical weights, optimizer and scheduler state to one epoch, stopped, and
resumed (TRAIN.RESUME) for the second; and the same from a mid-epoch checkpoint (TRAIN.CHECKPOINT_EVERY_STEPS,
resumed with TRAIN.CHECKPOINT). Every source of randomness is switched on (random crops and flips, dropout
masks, the Jacobian loss drawn with probability 0.5), so a random generator that is not carried over, or that
is advanced differently after a resume, changes the weights.
"""
import glob
import os
import shutil

import pytest
import torch

from mdeq.config import parse_args
from mdeq.core.classification import run_train
from mdeq.core.trainer import Hook
from mdeq.utils.cli import run_tool
from helpers.kit import assert_same_tree, restore_process_state, write_fashion_mnist  # noqa: F401 (autouse fixture)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = os.path.join(REPO, "experiments", "fashion_mnist", "cls_mdeq_quick.yaml")
STEPS_PER_EPOCH = 3  # 24 training images, batch 8

TINY = [
    "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8, 8]", "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", "[4, 8]",
    "MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE", "16", "MODEL.NUM_GROUPS", "4", "MODEL.EXPANSION_FACTOR", "1",
    "MODEL.NUM_LAYERS", "2", "DEQ.F_THRES", "3", "DEQ.B_THRES", "3", "WORKERS", "0", "PRINT_FREQ", "1",
    "TENSORBOARD", "False", "SEED", "0", "DETERMINISTIC", "True",
    "TRAIN.BATCH_SIZE_PER_GPU", "8", "TEST.BATCH_SIZE_PER_GPU", "16",
    "TRAIN.PRETRAIN_STEPS", "4",  # unrolled steps 0..3, equilibrium from the second epoch's second step
    "TRAIN.PRETRAIN_COUNT", "steps",  # (with multistep the original would count epochs)
    "TRAIN.LR_SCHEDULER", "multistep", "TRAIN.LR_STEP", "[1]", "TRAIN.LR_FACTOR", "0.1",  # a drop at epoch 1
    "TRAIN.CHECKPOINT_EVERY_STEPS", "2",
    "DATASET.AUGMENT", "True", "MODEL.DROPOUT", "0.25",
    "LOSS.JAC_LOSS_WEIGHT", "0.1", "LOSS.PRETRAIN_JAC_LOSS_WEIGHT", "0.1", "LOSS.JAC_LOSS_FREQ", "0.5",
]


@pytest.fixture
def fashion_root(tmp_path):
    return write_fashion_mnist(str(tmp_path / "fmnist"), n_train=8 * STEPS_PER_EPOCH, n_test=10)


def cls_train(argv, hooks=()):
    return run_tool(lambda: run_train(parse_args("cls_train", argv), hooks=hooks))


class KeepMidEpochCheckpoints(Hook):
    """Copies every mid-epoch checkpoint aside as it is written (the epoch-end checkpoint overwrites the same file
    later), as if the run had been killed just after writing it."""

    def __init__(self, folder):
        self.folder, self.saved = folder, []

    def on_checkpoint(self, trainer, path, epoch, batch):
        if batch > 0:
            copy = os.path.join(self.folder, f"mid_epoch{epoch}_batch{batch}.pth.tar")
            shutil.copyfile(path, copy)
            self.saved.append((epoch, batch, trainer.state.step, copy))


def train(tmp_path, root, run, end_epoch, *extra, hooks=()):
    """One cls_train run with its own log folder; returns (output folder, log text)."""
    out = str(tmp_path / f"out_{run.split('_')[0]}")
    log = str(tmp_path / f"log_{run}")
    argv = ["--cfg", CFG, "OUTPUT_DIR", out, "LOG_DIR", log, "DATASET.ROOT", root, "TRAIN.END_EPOCH",
            str(end_epoch)] + TINY + list(extra)
    assert cls_train(argv, hooks) == 0
    (log_file,) = glob.glob(os.path.join(log, "fashion_mnist", "cls_mdeq_quick", "*_train.log"))
    with open(log_file) as fh:
        return os.path.join(out, "fashion_mnist", "cls_mdeq_quick"), fh.read()


def load(folder, name):
    return torch.load(os.path.join(folder, name), map_location="cpu", weights_only=True)


def assert_same_training(a, b):
    """Same final weights (every tensor of final_state.pth.tar) and the same optimizer / scheduler state."""
    wa, wb = load(a, "final_state.pth.tar"), load(b, "final_state.pth.tar")
    assert set(wa) == set(wb)
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"
    ca, cb = load(a, "checkpoint.pth.tar"), load(b, "checkpoint.pth.tar")
    assert ca["epoch"] == cb["epoch"] == 2 and ca["step"] == cb["step"] == 2 * STEPS_PER_EPOCH
    assert_same_tree(ca["optimizer"], cb["optimizer"], "optimizer")
    assert_same_tree(ca["lr_scheduler"], cb["lr_scheduler"], "lr_scheduler")


def test_resume_gives_the_same_weights_as_one_run(tmp_path, fashion_root):
    # The uninterrupted run; every mid-epoch checkpoint it writes is copied aside.
    keep = KeepMidEpochCheckpoints(str(tmp_path))
    full, full_log = train(tmp_path, fashion_root, "full", 2, hooks=[keep])
    saved = keep.saved
    assert "\tunrolled" in full_log and "\tequilibrium" in full_log and "Jac " in full_log
    # steps 2 and 4 are multiples of CHECKPOINT_EVERY_STEPS that do not end an epoch
    assert [s[:3] for s in saved] == [(0, 2, 2), (1, 1, 4)]

    # Stopped after the first epoch, then resumed for the second.
    first, _ = train(tmp_path, fashion_root, "split_first", 1)
    w1, w2 = load(first, "final_state.pth.tar"), load(full, "final_state.pth.tar")
    assert any(not torch.equal(w1[k], w2[k]) for k in w1), "the second epoch must change the weights"
    resumed, log = train(tmp_path, fashion_root, "split_resumed", 2, "TRAIN.RESUME", "True")
    assert resumed == first
    ckpt_file = os.path.join(first, "checkpoint.pth.tar")
    assert f"=> resumed from {ckpt_file}: epoch 1, step {STEPS_PER_EPOCH}, batch 0" in log
    assert "Epoch: [0]" not in log and f"Epoch: [1][{STEPS_PER_EPOCH - 1}/{STEPS_PER_EPOCH}]" in log
    assert_same_training(full, resumed)

    # Resumed from each mid-epoch checkpoint: the rest of that epoch, then the remaining epochs.
    for epoch, batch, step, copy in saved:
        run = f"mid{epoch}{batch}_run"
        out, log = train(tmp_path, fashion_root, run, 2, "TRAIN.CHECKPOINT", copy)
        assert f"=> resumed from {copy}: epoch {epoch}, step {step}, batch {batch}" in log
        assert f"Epoch: [{epoch}][{batch}/{STEPS_PER_EPOCH}]" in log
        assert f"Epoch: [{epoch}][{batch - 1}/{STEPS_PER_EPOCH}]" not in log  # no batch is trained twice
        assert_same_training(full, out)


def test_a_resume_keeps_the_layout_its_checkpoint_was_trained_in(tmp_path, fashion_root, monkeypatch):
    """MODEL.CHANNELS_LAST auto decides by timing at every start; a resumed run must not switch layouts (the other
    layout rounds differently). The probe is made to answer channels_last for the first start and contiguous for
    the resume: the resume follows the checkpoint, and ends where the uninterrupted channels_last run ends."""
    from mdeq.models import layout_probe
    answers = []

    def probe(answer):
        def choose(model, sample, device, **kw):
            answers.append(answer)
            return answer, {"contiguous": 1.0, "channels_last": 0.5 if answer else 2.0}
        return choose

    auto = ["MODEL.CHANNELS_LAST", "auto"]
    monkeypatch.setattr(layout_probe, "choose_channels_last", probe(True))
    full, _ = train(tmp_path, fashion_root, "full", 2, *auto)
    first, _ = train(tmp_path, fashion_root, "split_first", 1, *auto)
    assert load(first, "checkpoint.pth.tar")["channels_last"] is True
    monkeypatch.setattr(layout_probe, "choose_channels_last", probe(False))
    resumed, log = train(tmp_path, fashion_root, "split_resumed", 2, *auto, "TRAIN.RESUME", "True")
    assert answers == [True, True, False]
    assert "resuming in the layout the checkpoint was trained in (channels_last)" in log
    assert load(resumed, "checkpoint.pth.tar")["channels_last"] is True
    assert_same_training(full, resumed)
    # an explicit setting is the user's: kept even against the record
    again, log = train(tmp_path, fashion_root, "split_again", 3, "MODEL.CHANNELS_LAST", "false", "TRAIN.RESUME", "True")
    assert "resuming in the layout" not in log
    assert load(again, "checkpoint.pth.tar")["channels_last"] is False
