"""seg_train with two CPU processes (Gloo, ``torch.distributed.run --nproc_per_node=2``) on the tiny Cityscapes
fixture: it trains like one process with the same global batch, and an interrupted run resumes to exactly the
weights of an uninterrupted one.

What can be asserted exactly, and why:

- Resume (two processes, random flips and dropout on): a worker killed mid-epoch (rank 1, SIGKILL, first attempt
  only), restarted by the elastic agent (``--max-restarts=1``) with AUTO_RESUME, continues from the mid-epoch
  checkpoint (TRAIN.CHECKPOINT_EVERY_STEPS 1) with every rank's own random generators and ends with weights
  bit-identical to an uninterrupted two-process run.
- One process against two: on the CPU there is no SyncBatchNorm (Gloo), so each process normalises with the
  statistics of its own share of the batch, and two processes with one image each do not compute what one
  process computes with both images. The comparison therefore uses a training list in which every global batch
  holds one image twice (``A A B B``, no shuffling): the statistics of one copy equal those of the pair, so the
  gradients of one process (mean over the pair) and of two (mean over the processes of each one's copy) are the
  same numbers up to rounding. Parameters and running means must agree to 1e-6 (seen: ~1e-8); running variances
  to a relative 4e-3, because BatchNorm's running variance takes the unbiased estimate (factor n / (n - 1) over
  the n pixels of the process's batch) and n halves, from 2 x 128 to 128 pixels at the smallest BatchNorm here:
  the factors differ by less than 4e-3.

The global batch is TRAIN.BATCH_SIZE_PER_GPU x len(GPUS) = 1 x 2 = 2 in both runs: one process loads batches of
two images, two processes one image each.
"""
import os
import re
import subprocess

import pytest
import torch

from mdeq.config import load_config
from mdeq.models import get_seg_net

from helpers import rel

SUB = os.path.join("cityscapes", "seg_mdeq_SMALL")
TOOL = os.path.join("tools", "seg_train.py")
STEP_LINE = re.compile(r"Epoch: \[(\d+)\]\[(\d+)/(\d+)\]")
GLOBAL_BATCH_OF_TWO = ["TRAIN.BATCH_SIZE_PER_GPU", "1", "GPUS", "(0, 1)"]


def _write_list(root, name, rows):
    with open(os.path.join(root, "list", "cityscapes", name), "w") as fh:
        fh.write("\n".join(rows) + "\n")
    return f"list/cityscapes/{name}"


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("seg_ddp") / "data")
    rel.make_cityscapes(root)
    with open(os.path.join(root, "list", "cityscapes", "train.lst")) as fh:
        train = fh.read().split("\n")[:3]
    with open(os.path.join(root, "list", "cityscapes", "val.lst")) as fh:
        val = fh.read().split("\n")[:1]
    return {"root": root,
            "four": _write_list(root, "train_four.lst", train + val),  # four different images
            "pairs": _write_list(root, "train_pairs.lst", [train[0], train[0], train[1], train[1]])}


def _opts(cityscapes, tmp_path, name, train_list, extra=()):
    return rel.SEG_TINY + GLOBAL_BATCH_OF_TWO + [
        "DATASET.ROOT", cityscapes["root"], "DATASET.TRAIN_SET", train_list,
        "OUTPUT_DIR", str(tmp_path / f"{name}_out"), "LOG_DIR", str(tmp_path / f"{name}_log"), "TRAIN.END_EPOCH", "2", "DETERMINISTIC", "True"] + list(extra)


def _run(tmp_path, name, args, timeout=300, **env):
    """Runs ``python args...`` (rel_hooks.py or torch.distributed.run) and returns (exit code, output)."""
    proc, fh = rel.start(args, rel.subprocess_env(**env), str(tmp_path / f"{name}.txt"))
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rel.kill_group(proc)
        pytest.fail(f"{name} did not finish within {timeout} s:\n{rel.read(str(tmp_path / f'{name}.txt'))[-4000:]}")
    finally:
        fh.close()
    return code, rel.read(str(tmp_path / f"{name}.txt"))


def _torchrun(kit, tmp_path, name, argv, restarts=0, **env):
    """seg_train under ``torch.distributed.run --nproc_per_node=2``; through rel_hooks.py when faults are asked
    for (REL_* variables in env)."""
    tool = rel.hooked("seg_train", argv) if env else [TOOL] + argv
    args = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--max-restarts={restarts}",
            "--monitor-interval=0.5", f"--master_port={kit.free_port()}"] + tool
    code, output = _run(tmp_path, name, args, **env)
    assert code == 0, output[-5000:]
    return output


def _final(tmp_path, name):
    return torch.load(str(tmp_path / f"{name}_out" / SUB / "final_state.pth"), weights_only=True)


def _steps(kit, tmp_path, name):
    """(epoch, i, total) of every logged training step."""
    text = "".join(rel.read(f) for f in kit.log_files(str(tmp_path / f"{name}_log" / SUB), "train"))
    return text, [tuple(int(v) for v in m) for m in STEP_LINE.findall(text)]


def test_two_processes_resume_mid_epoch_to_the_weights_of_an_uninterrupted_run(kit, tmp_path, cityscapes):
    argv = ["--cfg", rel.SEG_CFG]

    def opts(name):
        # random flips and dropout drawn by every rank from its own generators; a checkpoint after every step
        return argv + _opts(cityscapes, tmp_path, name, cityscapes["four"], [
            "TRAIN.SHUFFLE", "True", "TRAIN.FLIP", "True", "MODEL.DROPOUT", "0.25", "TRAIN.CHECKPOINT_EVERY_STEPS", "1",
            "AUTO_RESUME", "True"])

    # 4 images / 2 processes / 1 image each: 2 steps an epoch, 4 in all. Rank 1 dies in step 4, after the
    # mid-epoch checkpoint of step 3 (epoch 1, batch 1).
    output = _torchrun(kit, tmp_path, "elastic", opts("elastic"), restarts=1, REL_KILL_AT_STEP=4, REL_KILL_RANK=1)
    text, steps = _steps(kit, tmp_path, "elastic")
    resumed = [line for line in text.splitlines() if "resumed from" in line]
    assert len(resumed) == 1 and re.search(r"epoch 1\b.*step 3, batch 1\b", resumed[0]), output[-4000:]
    assert "continues from rank 0's" not in output
    assert steps[-1] == (1, 1, 2)
    ckpt = torch.load(str(tmp_path / "elastic_out" / SUB / "checkpoint.pth.tar"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 4 and len(ckpt["rng_per_rank"]) == 2

    _torchrun(kit, tmp_path, "plain", opts("plain"))
    _, plain_steps = _steps(kit, tmp_path, "plain")
    assert plain_steps == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    a, b = _final(tmp_path, "elastic"), _final(tmp_path, "plain")
    assert set(a) == set(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def test_two_processes_train_like_one_process_with_the_same_global_batch(kit, tmp_path, cityscapes):
    argv = ["--cfg", rel.SEG_CFG]
    extra = ["TRAIN.SHUFFLE", "False", "TRAIN.FLIP", "False", "MODEL.DROPOUT", "0.0"]
    # both runs start from these weights (TRAIN.MODEL_FILE), so that the distance travelled can be measured
    init = str(tmp_path / "init.pth")
    torch.manual_seed(0)
    start = get_seg_net(load_config(rel.SEG_CFG, _opts(cityscapes, tmp_path, "x", cityscapes["pairs"]))).state_dict()
    torch.save(start, init)
    extra += ["TRAIN.MODEL_FILE", init]
    code, output = _run(tmp_path, "one", [TOOL] + argv + _opts(cityscapes, tmp_path, "one", cityscapes["pairs"],
                                                                 extra))
    assert code == 0, output[-5000:]
    _torchrun(kit, tmp_path, "two", argv + _opts(cityscapes, tmp_path, "two", cityscapes["pairs"], extra))

    # global batch 2 over 4 list entries: 2 steps an epoch in both runs
    one_text, one_steps = _steps(kit, tmp_path, "one")
    two_text, two_steps = _steps(kit, tmp_path, "two")
    assert "1 process(es)" in one_text and "2 process(es)" in two_text
    expected = [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    assert two_steps == expected
    assert one_steps == expected, "one process must load batches of BATCH_SIZE_PER_GPU x len(GPUS) = 2 images"

    one, two = _final(tmp_path, "one"), _final(tmp_path, "two")
    assert set(one) == set(two)
    for key in one:
        if not one[key].is_floating_point():
            assert torch.equal(one[key], two[key]), key
        elif key.endswith("running_var"):
            assert torch.allclose(two[key], one[key], rtol=4e-3, atol=0), key
        else:
            assert torch.allclose(two[key], one[key], rtol=0, atol=1e-6), key
    # the agreement is between trained weights: training moved parameters by up to 1000 times the tolerance, and
    # the two updates differ by less than 0.1 % of their size (with four different images instead of pairs, where
    # per-process BatchNorm statistics differ, the difference is of the order of the update itself)
    params = [k for k in one if one[k].is_floating_point() and "running" not in k]
    d_one = torch.cat([(one[k] - start[k]).flatten().double() for k in params])
    d_two = torch.cat([(two[k] - start[k]).flatten().double() for k in params])
    assert d_one.abs().max() > 1e-3
    assert (d_two - d_one).norm() < 1e-3 * d_one.norm()
