"""Crashes: a training process killed with SIGKILL, in the middle of an epoch or in the middle of writing a
checkpoint, loses nothing but the work since its last checkpoint.

Under deterministic CPU settings (SEED, DETERMINISTIC, WORKERS 0, one thread) the restarted run ends with exactly
the weights and optimizer state of an uninterrupted run, with every source of randomness switched on (random
crops and flips, dropout masks, the Jacobian loss drawn with probability 0.5). The faults come from
``rel_hooks.py``: a pause at a chosen training step, or a hang halfway through writing the bytes of a chosen
checkpoint, at which point the test kills the process (and its process group) with SIGKILL.
"""
import os

import pytest
import torch

from helpers import rel as rel_kit
from helpers.kit import assert_same_tree
from mdeq.utils.checkpoint import CheckpointError, safe_load

STEPS_PER_EPOCH = 3  # 24 training images, batch 8
SUB = os.path.join("fashion_mnist", "cls_mdeq_quick")
DETERMINISTIC = [
    "SEED", "0", "DETERMINISTIC", "True", "WORKERS", "0", "TRAIN.BATCH_SIZE_PER_GPU", "8",
    "TEST.BATCH_SIZE_PER_GPU", "10", "TRAIN.END_EPOCH", "2", "TRAIN.PRETRAIN_STEPS", "4",
    "DATASET.AUGMENT", "True", "MODEL.DROPOUT", "0.25", "LOSS.JAC_LOSS_WEIGHT", "0.1",
    "LOSS.PRETRAIN_JAC_LOSS_WEIGHT", "0.1", "LOSS.JAC_LOSS_FREQ", "0.5",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The Fashion-MNIST fixture, shared by the tests of this file."""
    base = tmp_path_factory.mktemp("crash")
    root = rel_kit.tools.write_fashion_mnist(str(base / "fmnist"), n_train=8 * STEPS_PER_EPOCH, n_test=10)
    return {"base": base, "root": root, "tiny": list(rel_kit.tools.TINY_MODEL)}


def opts(data, out, log, *extra):
    return (["--cfg", rel_kit.tools.FASHION_CFG, "DATASET.ROOT", data["root"], "OUTPUT_DIR", out, "LOG_DIR", log]
            + data["tiny"] + DETERMINISTIC + list(extra))


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training(ref_dir, other_dir):
    wa, wb = load(os.path.join(ref_dir, "final_state.pth.tar")), load(os.path.join(other_dir, "final_state.pth.tar"))
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert set(wa) == set(wb) and not different, f"{len(different)} tensors differ, e.g. {different[:5]}"
    ca, cb = load(os.path.join(ref_dir, "checkpoint.pth.tar")), load(os.path.join(other_dir, "checkpoint.pth.tar"))
    assert ca["epoch"] == cb["epoch"] and ca["step"] == cb["step"]
    assert_same_tree(ca["optimizer"], cb["optimizer"], "optimizer")
    assert_same_tree(ca["lr_scheduler"], cb["lr_scheduler"], "lr_scheduler")


def run(argv, log_file, **env):
    """A cls_train run in a subprocess through rel_hooks.py, to the end; returns its output."""
    code, output = rel_kit.run_to_end(rel_kit.hooked("cls_train", argv), rel_kit.subprocess_env(**env), log_file,
                                      timeout=240)
    assert code == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def reference(data):
    """The uninterrupted run, in a subprocess like the runs it is compared with."""
    out, log = str(data["base"] / "ref_out"), str(data["base"] / "ref_log")
    run(opts(data, out, log, "TRAIN.CHECKPOINT_EVERY_STEPS", "2"), str(data["base"] / "ref.txt"))
    return os.path.join(out, SUB)


def killed_run(rel, data, name, marker_env, *extra):
    """Starts a run with a fault cue, waits until the fault point is reached, and SIGKILLs the process there.
    Returns the output folder and the run's output so far."""
    out, log = str(data["base"] / f"{name}_out"), str(data["base"] / f"{name}_log")
    marker = str(data["base"] / f"{name}.marker")
    proc, fh = rel.start(rel.hooked("cls_train", opts(data, out, log, *extra)),
                         rel.env(REL_MARKER=marker, **marker_env), str(data["base"] / f"{name}.txt"))
    try:
        rel.wait_for(marker, proc, timeout=180)
    finally:
        rel.kill_group(proc)
        fh.close()
    assert proc.returncode == -9, proc.returncode
    return out, log, rel.read(str(data["base"] / f"{name}.txt"))


@pytest.mark.parametrize("pause_step, expected", [(3, (0, 2, 2)), (5, (1, 4, 1))])
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(kit, rel, data, reference, pause_step,
                                                                    expected):
    """Killed while training the batch after a mid-epoch checkpoint; TRAIN.RESUME continues from that batch."""
    out, log, _ = killed_run(rel, data, f"sigkill{pause_step}", {"REL_PAUSE_AT_STEP": pause_step},
                             "TRAIN.CHECKPOINT_EVERY_STEPS", "2")
    folder = os.path.join(out, SUB)
    ckpt = load(os.path.join(folder, "checkpoint.pth.tar"))
    assert (ckpt["epoch"], ckpt["step"], ckpt["batch"]) == expected  # the newest checkpoint is mid-epoch
    assert not os.path.exists(os.path.join(folder, "final_state.pth.tar"))
    assert rel.partial_files(folder) == []

    output = run(opts(data, out, log, "TRAIN.CHECKPOINT_EVERY_STEPS", "2", "TRAIN.RESUME", "True"),
                 str(data["base"] / f"sigkill{pause_step}_resumed.txt"))
    epoch, step, batch = expected
    assert f"resumed from {os.path.join(folder, 'checkpoint.pth.tar')}: epoch {epoch}, step {step}, batch " \
           f"{batch}" in output
    assert f"Epoch: [{epoch}][{batch}/{STEPS_PER_EPOCH}]" in output
    assert f"Epoch: [{epoch}][{batch - 1}/{STEPS_PER_EPOCH}]" not in output  # no batch trained twice
    assert_same_training(reference, folder)


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(kit, rel, data, reference):
    """Killed halfway through writing the epoch-end checkpoint: checkpoint.pth.tar is still the previous
    (mid-epoch) checkpoint, intact; the half-written temporary file is never mistaken for a checkpoint, is
    cleared by the next run, and AUTO_RESUME continues to the same result as an uninterrupted run."""
    # saves of this run: 1 = mid-epoch (epoch 0, batch 2), 2 = end of epoch 0; hang inside the second
    out, log, _ = killed_run(rel, data, "savekill", {"REL_HANG_IN_SAVE": 2}, "TRAIN.CHECKPOINT_EVERY_STEPS", "2")
    folder = os.path.join(out, SUB)
    ckpt = safe_load(os.path.join(folder, "checkpoint.pth.tar"))
    assert (ckpt["epoch"], ckpt["step"], ckpt["batch"]) == (0, 2, 2)
    partial = rel.partial_files(folder)
    assert len(partial) == 1 and partial[0].startswith(".checkpoint.pth.tar."), partial
    partial_path = os.path.join(folder, partial[0])
    assert os.path.getsize(partial_path) > 0
    with pytest.raises(CheckpointError):
        safe_load(partial_path)

    output = run(opts(data, out, log, "TRAIN.CHECKPOINT_EVERY_STEPS", "2", "AUTO_RESUME", "True"),
                 str(data["base"] / "savekill_resumed.txt"))
    assert f"removed {partial_path}, a partial checkpoint" in output
    assert "epoch 0, step 2, batch 2" in output
    assert rel.partial_files(folder) == []
    assert_same_training(reference, folder)


def test_disk_full_while_writing_a_checkpoint_is_a_clear_error_and_the_run_resumes(kit, rel, data, reference):
    """The disk fills up halfway through writing the epoch-end checkpoint: the tool ends with exit 2 and one
    `error:` line that names the file, the cause and how to continue; the previous (mid-epoch) checkpoint is
    intact, no partial file is left, and TRAIN.RESUME continues to the same result as an uninterrupted run."""
    out, log = str(data["base"] / "full_out"), str(data["base"] / "full_log")
    log_file = str(data["base"] / "full.txt")
    proc, fh = rel.start(rel.hooked("cls_train", opts(data, out, log, "TRAIN.CHECKPOINT_EVERY_STEPS", "2")),
                         rel.env(REL_DISK_FULL_IN_SAVE=2), log_file)
    try:
        code = proc.wait(timeout=240)
    finally:
        rel.kill_group(proc)
        fh.close()
    output = rel.read(log_file)
    folder = os.path.join(out, SUB)
    assert code == 2, output[-3000:]
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    assert os.path.join(folder, "checkpoint.pth.tar") in errors[0]
    assert "No space left on device" in errors[0] and "the previous file there is unchanged" in errors[0]
    assert "TRAIN.RESUME True" in errors[0]
    ckpt = safe_load(os.path.join(folder, "checkpoint.pth.tar"))
    assert (ckpt["epoch"], ckpt["step"], ckpt["batch"]) == (0, 2, 2)
    assert rel.partial_files(folder) == []

    resumed = run(opts(data, out, log, "TRAIN.CHECKPOINT_EVERY_STEPS", "2", "TRAIN.RESUME", "True"),
                  str(data["base"] / "full_resumed.txt"))
    assert "epoch 0, step 2, batch 2" in resumed
    assert_same_training(reference, folder)


def test_auto_resume_takes_the_newest_valid_checkpoint_and_skips_a_corrupted_one(kit, rel, data, tmp_path,
                                                                                 capsys):
    """Epoch-end checkpoints only: checkpoint.pth.tar (epoch 2) and the one it replaced (checkpoint_prev, epoch
    1). AUTO_RESUME takes the newest; when that one is corrupted, it is set aside (bytes kept) and training goes
    on from the older one, to the same weights as an uninterrupted run."""
    # a schedule that does not depend on END_EPOCH (a cosine one is stretched over the epochs of the first run)
    every = ["TRAIN.CHECKPOINT_EVERY_STEPS", "0", "TRAIN.LR_SCHEDULER", "multistep", "TRAIN.LR_STEP", "[1]",
             "TRAIN.LR_FACTOR", "0.1"]
    full_out, split_out = str(tmp_path / "full"), str(tmp_path / "split")
    assert kit.call_tool("cls_train", opts(data, full_out, str(tmp_path / "l1"), *every, "TRAIN.END_EPOCH",
                                           "3")) == 0
    assert kit.call_tool("cls_train", opts(data, split_out, str(tmp_path / "l2"), *every)) == 0
    folder = os.path.join(split_out, SUB)
    assert load(os.path.join(folder, "checkpoint.pth.tar"))["epoch"] == 2
    assert load(os.path.join(folder, "checkpoint_prev.pth.tar"))["epoch"] == 1

    # both readable: the newest wins
    capsys.readouterr()
    newest = str(tmp_path / "newest")
    os.makedirs(os.path.join(newest, SUB))
    for name in ("checkpoint.pth.tar", "checkpoint_prev.pth.tar"):
        with open(os.path.join(folder, name), "rb") as src, open(os.path.join(newest, SUB, name), "wb") as dst:
            dst.write(src.read())
    assert kit.call_tool("cls_train", opts(data, newest, str(tmp_path / "l3"), *every, "TRAIN.END_EPOCH", "3",
                                           "AUTO_RESUME", "True")) == 0
    out = capsys.readouterr().out
    assert f"resumed from {os.path.join(newest, SUB, 'checkpoint.pth.tar')}: epoch 2" in out
    assert_same_training(os.path.join(full_out, SUB), os.path.join(newest, SUB))

    # the newest corrupted (a copy cut short): skipped and set aside, the older one is used
    latest = os.path.join(folder, "checkpoint.pth.tar")
    with open(latest, "rb") as fh:
        data_bytes = fh.read()
    with open(latest, "wb") as fh:
        fh.write(data_bytes[: len(data_bytes) // 2])
    assert kit.call_tool("cls_train", opts(data, split_out, str(tmp_path / "l4"), *every, "TRAIN.END_EPOCH", "3",
                                           "AUTO_RESUME", "True")) == 0
    out = capsys.readouterr().out
    assert f"skipping unusable checkpoint {latest}" in out and "not a readable checkpoint" in out
    assert f"resumed from {os.path.join(folder, 'checkpoint_prev.pth.tar')}: epoch 1" in out
    with open(latest + ".unusable", "rb") as fh:
        assert fh.read() == data_bytes[: len(data_bytes) // 2]
    assert_same_training(os.path.join(full_out, SUB), folder)


def test_mid_epoch_checkpoint_resumed_by_another_number_of_processes_is_flagged(kit, data, tmp_path, capsys):
    """A mid-epoch checkpoint counts batches per process: resuming it with another number of processes cannot
    continue the same sample order, and the log says so (an epoch-end checkpoint resumes silently)."""
    out = str(tmp_path / "out")
    assert kit.call_tool("cls_train", opts(data, out, str(tmp_path / "l1"), "TRAIN.CHECKPOINT_EVERY_STEPS", "2",
                                           "TRAIN.END_EPOCH", "1")) == 0
    folder = os.path.join(out, SUB)
    mid = load(os.path.join(folder, "checkpoint_prev.pth.tar"))
    assert (mid["batch"], mid["world_size"]) == (2, 1)
    two = str(tmp_path / "from_two_processes.pth.tar")
    torch.save(dict(mid, world_size=2), two)
    capsys.readouterr()
    assert kit.call_tool("cls_train", opts(data, out, str(tmp_path / "l2"), "TRAIN.END_EPOCH", "1",
                                           "TRAIN.CHECKPOINT", two)) == 0
    text = capsys.readouterr().out
    assert f"{two} was written mid-epoch by 2 process(es) and is resumed by 1" in text
    assert kit.call_tool("cls_train", opts(data, out, str(tmp_path / "l3"), "TRAIN.END_EPOCH", "2",
                                           "TRAIN.CHECKPOINT", os.path.join(folder, "checkpoint.pth.tar"))) == 0
    assert "was written mid-epoch" not in capsys.readouterr().out
