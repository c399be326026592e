"""Preemption: SIGTERM or SIGUSR1 during training makes every process stop at the next step boundary, rank 0 write
a mid-epoch training checkpoint, and the tool exit with status 3 and one ``stopped:`` line naming the file and how
to continue. The same command with AUTO_RESUME True continues from that batch and ends with exactly the weights
of an uninterrupted run, with one process and with two (one rank's signal stops both), wherever the signal
arrives. Signals are sent by the process to itself at a randomly chosen step (rel_hooks.py REL_SIGNAL_AT_STEP),
so that the step is exact; the seed of the choice is in the assertion messages.
"""
import os
import random
import time

import pytest
import torch

from helpers import rel as rel_kit

SUB = os.path.join("fashion_mnist", "cls_mdeq_quick")
STEPS = 3  # steps per epoch: 24 images, global batch 8
OPTS = ["SEED", "0", "DETERMINISTIC", "True", "WORKERS", "0", "TRAIN.BATCH_SIZE_PER_GPU", "8",
        "TEST.BATCH_SIZE_PER_GPU", "10", "TRAIN.END_EPOCH", "2", "TRAIN.PRETRAIN_STEPS", "4",
        "DATASET.AUGMENT", "True", "MODEL.DROPOUT", "0.25", "LOSS.JAC_LOSS_WEIGHT", "0.1",
        "LOSS.PRETRAIN_JAC_LOSS_WEIGHT", "0.1", "LOSS.JAC_LOSS_FREQ", "0.5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("signals")
    root = rel_kit.tools.write_fashion_mnist(str(base / "fmnist"), n_train=8 * STEPS, n_test=10)
    return {"base": base, "root": root}


def argv(data, name, *extra):
    return (["--cfg", rel_kit.tools.FASHION_CFG, "DATASET.ROOT", data["root"], "OUTPUT_DIR",
             str(data["base"] / f"{name}_out"), "LOG_DIR", str(data["base"] / f"{name}_log")]
            + rel_kit.tools.TINY_MODEL + OPTS + list(extra))


def launch(data, name, args, processes, **env):
    """cls_train through rel_hooks.py, with one process or under torchrun with two; returns (code, output)."""
    cmd = rel_kit.hooked("cls_train", args)
    if processes > 1:
        cmd = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               f"--master_port={rel_kit.tools.free_port()}"] + cmd
    return rel_kit.run_to_end(cmd, rel_kit.subprocess_env(**env), str(data["base"] / f"{name}.txt"))


def weights(data, name):
    return torch.load(os.path.join(str(data["base"] / f"{name}_out"), SUB, "final_state.pth.tar"),
                      map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def references(data):
    """Uninterrupted runs with one and with two processes (global batch 8 in both)."""
    out = {}
    for processes in (1, 2):
        name = f"ref{processes}"
        code, output = launch(data, name, argv(data, name), processes)
        assert code == 0, output[-4000:]
        out[processes] = weights(data, name)
    return out


@pytest.mark.parametrize("processes, signal_name, rank, fixed_step", [
    (1, "SIGTERM", 0, None), (1, "SIGUSR1", 0, None), (2, "SIGTERM", 1, None),
    (1, "SIGTERM", 0, STEPS),  # in the last step of an epoch: the checkpoint is before that epoch's validation
])
def test_a_signal_at_a_random_step_stops_cleanly_and_resumes_to_the_same_weights(data, references, processes,
                                                                                 signal_name, rank, fixed_step):
    seed = time.time_ns() % 100000
    step = fixed_step or random.Random(seed).randint(1, 2 * STEPS - 1)  # counted from 1: the step it arrives in
    where = f"(seed {seed}: signal in step {step}, {processes} process(es))"
    name = f"sig{processes}_{signal_name}_{step}_{'fixed' if fixed_step else 'random'}"
    args = argv(data, name, "AUTO_RESUME", "True")
    started = time.time()
    code, output = launch(data, name, args, processes, REL_SIGNAL_AT_STEP=step, REL_SIGNAL=signal_name,
                          REL_SIGNAL_RANK=rank)
    assert time.time() - started < 60, where
    assert code != 0, (where, output[-4000:])
    if processes == 1:  # (under torchrun the launcher reports the workers' exit status 3 in its own words)
        assert code == 3 and "Traceback" not in output, (where, output[-4000:])
    folder = os.path.join(str(data["base"] / f"{name}_out"), SUB)
    ckpt = torch.load(os.path.join(folder, "checkpoint.pth.tar"), map_location="cpu", weights_only=True)
    epoch, batch = divmod(step - 1, STEPS)  # it stops after the step it arrived in (batch counts from 0) ...
    batch += 1  # ... and resumes with the next batch (after the last one of an epoch: that epoch's validation)
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (epoch, batch, step), where
    assert f"stopped: received {signal_name}" in output and "AUTO_RESUME True" in output, where
    assert not os.path.exists(os.path.join(folder, "final_state.pth.tar")), where

    code, output = launch(data, name + "_resumed", args, processes)  # the same command
    assert code == 0, (where, output[-4000:])
    assert f"resumed from {os.path.join(folder, 'checkpoint.pth.tar')}: epoch {epoch}, step {step}, " \
           f"batch {batch}" in output, where
    reference, resumed = references[processes], weights(data, name)
    different = [k for k in reference if not torch.equal(reference[k], resumed[k])]
    assert not different, (where, different[:5])
