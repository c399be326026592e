"""Distributed faults on CPU (gloo), two processes under torch.distributed.run.

- A worker killed with SIGKILL in the middle of an epoch (rank 1 kills itself at a chosen step, on the first
  attempt only) makes the elastic agent restart the job (--max-restarts=1); with AUTO_RESUME the new attempt
  continues from the last checkpoint to the end, with exactly the weights of an uninterrupted two-process run,
  random augmentation and dropout included (each rank resumes its own random generators).
- Ranks never write the same file: every file a process opens for writing, renames into place or writes as a PNG
  is recorded (rel_hooks.py); checkpoints, logs, the saved config and TensorBoard files come from rank 0 only, and
  the prediction PNGs of seg_test are per shard, disjoint, and together cover the split once.
"""
import collections
import glob
import os
import sys

import pytest
import torch

from mdeq.config import load_config
from mdeq.models import get_seg_net

SUB = os.path.join("fashion_mnist", "cls_mdeq_quick")


def torchrun(kit, rel, tmp_path, tool, argv, name, restarts=0, timeout=300, **env):
    """Runs ``torchrun --nproc_per_node=2`` on rel_hooks.py; returns (exit code, output, audit folder)."""
    audit = str(tmp_path / f"audit_{name}")
    args = ["-m", "torch.distributed.run", "--nproc_per_node=2", f"--max-restarts={restarts}",
            "--monitor-interval=0.5", f"--master_port={kit.free_port()}"] + rel.hooked(tool, argv)
    code, output = rel.run_to_end(args, rel.env(REL_AUDIT_DIR=audit, REL_AUDIT_ROOT=str(tmp_path), **env),
                                  str(tmp_path / f"{name}.txt"), timeout=timeout)
    return code, output, audit


def writes(audit):
    """{path: {ranks that wrote it}} and {(rank, attempt): [paths]} from the audit records."""
    by_path, by_process = collections.defaultdict(set), collections.defaultdict(list)
    for record in glob.glob(os.path.join(audit, "writes_rank*_attempt*_pid*.tsv")):
        name = os.path.basename(record)
        rank = int(name.split("_rank")[1].split("_")[0])
        attempt = int(name.split("_attempt")[1].split("_")[0])
        with open(record) as fh:
            for line in fh:
                event, path = line.rstrip("\n").split("\t")
                by_path[path].add(rank)
                by_process[(rank, attempt)].append((event, path))
    return by_path, by_process


def under(path, folder):
    return os.path.abspath(path).startswith(os.path.abspath(folder) + os.sep)


def test_killed_worker_restarts_and_resumes_to_the_same_weights(kit, rel, tmp_path):
    root = kit.write_fashion_mnist(str(tmp_path / "fmnist"), n_train=40, n_test=10)

    def argv(name):
        return ["--cfg", kit.FASHION_CFG] + kit.TINY_MODEL + [
            "DATASET.ROOT", root, "OUTPUT_DIR", str(tmp_path / f"{name}_out"), "LOG_DIR", str(tmp_path / f"{name}_log"),
            "TRAIN.BATCH_SIZE_PER_GPU", "4", "TEST.BATCH_SIZE_PER_GPU", "5", "TRAIN.END_EPOCH", "2",
            "TRAIN.PRETRAIN_STEPS", "3", "TRAIN.CHECKPOINT_EVERY_STEPS", "2", "AUTO_RESUME", "True",
            "SEED", "0", "DETERMINISTIC", "True", "TENSORBOARD", "True",
            # random numbers drawn by every rank from its own generators (seeded SEED + rank): the resumed
            # attempt must restore each rank's own state to end with the same weights
            "DATASET.AUGMENT", "True", "MODEL.DROPOUT", "0.25"]

    # 40 images / 2 ranks / batch 4: 5 steps an epoch. Rank 1 dies in step 4 (after the checkpoint of step 2).
    code, output, audit = torchrun(kit, rel, tmp_path, "cls_train", argv("elastic"), "elastic", restarts=1,
                                   REL_KILL_AT_STEP=4, REL_KILL_RANK=1)
    assert code == 0, output[-5000:]
    out_dir, log_dir = str(tmp_path / "elastic_out" / SUB), str(tmp_path / "elastic_log" / SUB)
    logs = "".join(rel.read(f) for f in kit.log_files(log_dir, "train"))
    assert "resumed from" in logs and "epoch 0, step 2, batch 2" in logs, output[-5000:]
    assert "continues from rank 0's" not in output
    ckpt = torch.load(os.path.join(out_dir, "checkpoint.pth.tar"), weights_only=True)
    assert len(ckpt["rng_per_rank"]) == 2
    assert not torch.equal(ckpt["rng_per_rank"][0]["torch"], ckpt["rng_per_rank"][1]["torch"])
    assert os.path.isfile(os.path.join(out_dir, "final_state.pth.tar"))
    by_path, by_process = writes(audit)
    assert {attempt for _, attempt in by_process} == {0, 1}, "the job was restarted once"

    # only rank 0 wrote into the output and log folders, and no file was written by two ranks
    shared = {p: r for p, r in by_path.items() if len(r) > 1}
    assert not shared, f"files written by several ranks: {shared}"
    for (rank, attempt), events in by_process.items():
        ours = [p for _, p in events if under(p, out_dir) or under(p, log_dir)]
        if rank != 0:
            assert ours == [], (rank, attempt, ours)
    rank0 = {os.path.basename(p) for (rank, _), events in by_process.items() if rank == 0 for _, p in events}
    assert {"checkpoint.pth.tar", "final_state.pth.tar", "cls_mdeq_quick_train_config.yaml"} <= rank0
    assert any(n.startswith("events.out.tfevents") for n in rank0) and any(n.endswith("_train.log") for n in rank0)
    assert rel.partial_files(out_dir) == []

    # the same job without the fault: identical weights
    code, output, _ = torchrun(kit, rel, tmp_path, "cls_train", argv("plain"), "plain")
    assert code == 0, output[-5000:]
    a = torch.load(os.path.join(out_dir, "final_state.pth.tar"), weights_only=True)
    b = torch.load(str(tmp_path / "plain_out" / SUB / "final_state.pth.tar"), weights_only=True)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert set(a) == set(b) and not different, different[:5]


def test_seg_test_prediction_files_are_per_shard_and_disjoint(kit, rel, tmp_path):
    root = str(tmp_path / "cityscapes")
    written = rel.make_cityscapes(root)
    opts = rel.SEG_TINY + ["DATASET.ROOT", root, "OUTPUT_DIR", str(tmp_path / "out"), "LOG_DIR",
                           str(tmp_path / "log"), "TRAIN.RESUME", "False"]
    model = str(tmp_path / "seg.pth")
    torch.manual_seed(0)
    torch.save(get_seg_net(load_config(rel.SEG_CFG, opts)).state_dict(), model)
    pred = str(tmp_path / "pred")
    code, output, audit = torchrun(kit, rel, tmp_path, "seg_test", ["--cfg", rel.SEG_CFG, "--testModel", model]
                                   + opts + ["TEST.SAVE_PREDICTIONS", "True", "TEST.OUTPUT_DIR", pred], "segtest")
    assert code == 0, output[-5000:]
    by_path, by_process = writes(audit)
    pngs = {rank: sorted(p for e, p in events if e == "png") for (rank, _), events in by_process.items()}
    assert set(pngs) == {0, 1} and all(pngs.values()), pngs
    assert not set(pngs[0]) & set(pngs[1]), "two ranks wrote the same prediction file"
    n_val = len(written["val"])
    on_disk = sorted(glob.glob(os.path.join(pred, "*", "*.png")))
    assert sorted(pngs[0] + pngs[1]) == on_disk and len(on_disk) == 3 * n_val  # color, overlay, label_ids
    shared = {p: r for p, r in by_path.items() if len(r) > 1}
    assert not shared, shared
    log_dir = str(tmp_path / "log")
    assert [p for _, p in by_process[(1, 0)] if under(p, log_dir)] == []


@pytest.mark.skipif(sys.platform != "linux", reason="the audit of writes reads Linux process semantics")
def test_audit_records_what_a_process_writes(rel, tmp_path):
    """The control for the checks above: the recorder does see writes by open(), os.open + rename and PNGs."""
    import subprocess

    script = tmp_path / "probe.py"
    script.write_text(
        "import os\n"
        "import rel_hooks  # from PYTHONPATH\n"
        "rel_hooks.install_audit()\n"
        "import numpy as np\n"
        "from mdeq.core import seg_inference\n"
        f"open({str(tmp_path / 'a.txt')!r}, 'w').close()\n"
        f"fd = os.open({str(tmp_path / 'b.tmp')!r}, os.O_WRONLY | os.O_CREAT); os.close(fd)\n"
        f"os.replace({str(tmp_path / 'b.tmp')!r}, {str(tmp_path / 'b.bin')!r})\n"
        f"seg_inference._write_png({str(tmp_path / 'c.png')!r}, np.zeros((2, 2), np.uint8))\n"
        f"open({str(tmp_path / 'a.txt')!r}).read()\n")
    audit = tmp_path / "audit"
    subprocess.run([sys.executable, str(script)], check=True, timeout=120,
                   env=rel.env(REL_AUDIT_DIR=str(audit), REL_AUDIT_ROOT=str(tmp_path), RANK="3",
                               PYTHONPATH=os.pathsep.join([os.path.dirname(rel.HOOKS)] + [
                                   p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])))
    by_path, _ = writes(str(audit))
    assert set(by_path) == {str(tmp_path / n) for n in ("a.txt", "b.tmp", "b.bin", "c.png")}
    assert all(r == {3} for r in by_path.values())
