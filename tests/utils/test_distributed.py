"""mdeq.utils.distributed: the device choice as a user error, the one-process forms of the collectives, and a
real two-process group on the CPU (Gloo) started the way srun starts tasks (SLURM variables only) and the way
torchrun does: collectives, SyncBatchNorm's support, and the shared-folder check (a clear error on every rank
rather than a hang when one process sees another folder)."""
import importlib.util
import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch

from mdeq.utils import cluster
from mdeq.utils import distributed as du
from mdeq.utils.cli import run_tool

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "dist_worker.py")
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")


# ------------------------------------------------------------------------------------------------- device
def test_device_cuda_without_a_gpu_is_a_user_error_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(du.DeviceUnavailableError, match="use DEVICE auto or cpu") as info:
        du.select_device("cuda")
    assert isinstance(info.value, ValueError) and not isinstance(info.value, RuntimeError)
    assert du.select_device("auto") == torch.device("cpu") and du.select_device("CPU") == torch.device("cpu")


def test_the_tools_print_the_device_error_on_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_tool(lambda: du.select_device("cuda")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: DEVICE is 'cuda'") and err.count("\n") == 1 and "Traceback" not in err
    # through a real tool, before any data is read
    spec = importlib.util.spec_from_file_location("_cls_train_tool", os.path.join(REPO, "tools", "cls_train.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cfg = os.path.join(REPO, "experiments", "cifar", "cls_mdeq_TINY.yaml")
    code = tool.main(["--cfg", cfg, "DEVICE", "cuda", "DATASET.ROOT", str(tmp_path / "nothing"),
                      "OUTPUT_DIR", str(tmp_path / "out"), "LOG_DIR", str(tmp_path / "log")])
    err = capsys.readouterr().err
    assert code == 2 and "error: DEVICE is 'cuda' but no CUDA device is available" in err, err
    assert "use DEVICE auto or cpu" in err and "Traceback" not in err


def test_sync_batchnorm_is_supported_on_cuda_with_nccl_only(monkeypatch):
    assert du.sync_batchnorm_supported(torch.device("cpu")) is False
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    assert du.sync_batchnorm_supported(torch.device("cuda", 0)) is True
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    assert du.sync_batchnorm_supported(torch.device("cuda", 0)) is False


# ------------------------------------------------------------------------------------------ one process
def test_collectives_in_one_process_are_identities(tmp_path):
    assert not du.is_distributed()
    obj = {"a": [1, 2]}
    gathered = du.all_gather_object(obj)
    assert gathered == [obj] and gathered[0] is obj
    t = torch.tensor([2.0])
    assert du.all_reduce_sum(t) is t and t.item() == 2.0
    du.check_shared_folder(str(tmp_path / "never_made"))  # nothing to compare with, nothing written
    assert not (tmp_path / "never_made").exists()


# ------------------------------------------------------------------------------------------ two processes
def _base_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in list(env):
        if key.startswith("SLURM_") or key in LAUNCH_ENV:
            del env[key]
    return env


def _job_id_with_free_port():
    """A SLURM job id whose derived rendezvous port is free on this machine now."""
    rng = random.Random()
    for _ in range(200):
        job_id = rng.randrange(10 ** 5, 10 ** 7)
        port = cluster.slurm_port(str(job_id))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return str(job_id), port
    pytest.fail("no free port in the range derived from SLURM job ids")


def _run_pair(tmp_path, envs):
    """Starts dist_worker.py once per environment; returns the per-rank results (fails on a hang or error)."""
    results, shared, private = tmp_path / "results", tmp_path / "shared", tmp_path / "private"
    for folder in (results, shared, private):
        folder.mkdir()
    (private / "blocker").write_text("a file where a folder should be")
    procs = [subprocess.Popen([sys.executable, WORKER, str(results), str(shared), str(private)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for env in envs]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=120)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.wait()
        pytest.fail("the two processes did not finish within 120 s (a hang)")
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]
    out = {}
    for rank in range(len(envs)):
        with open(results / f"rank{rank}.json") as fh:
            out[rank] = json.load(fh)
    return out, shared, private


def _check_pair(results, shared, private):
    for rank, r in results.items():
        assert r["started"] is True and r["rank"] == rank and r["world"] == 2
        assert r["sum"] == 3.0  # 1 + 2
        assert [g["rank"] for g in r["gathered"]] == [0, 1]
        assert r["gathered"][rank]["pid"] != r["gathered"][1 - rank]["pid"]
        assert r["broadcast"] == "from rank 0"
        # SyncBatchNorm refuses CPU tensors in a process group, as sync_batchnorm_supported(cpu) says
        assert r["sync_bn_ran"] is False and r["sync_bn_supported"] is False
        # the shared folder passed and the check left nothing behind
        assert r["shared_left"] == []
        # the per-node folder: the same clear error on both ranks, naming the folder, the rank and the fix
        error = r["private_error"]
        assert error is not None, rank
        assert f"the output folder {os.path.join(str(private), f'node{rank}')} is not on a filesystem every node " \
               f"sees" in error
        assert "rank 1 on" in error and "rank 0 on" not in error
        assert error.endswith("put OUTPUT_DIR/LOG_DIR on a shared filesystem")
        # rank 0 cannot create the folder: every rank gets its error instead of waiting for rank 0
        assert r["unwritable_error"].startswith(
            f"cannot write into the output folder {os.path.join(str(private), 'blocker', 'out')} (")
    assert os.listdir(shared) == [] and os.listdir(private / "node0") == []  # rank 0 cleaned up both
    assert sorted(os.listdir(private)) == ["blocker", "node0"]
    assert not (private / "node1").exists()  # only rank 0 creates the folder


def test_two_tasks_started_like_srun_join_one_group_and_run_collectives(tmp_path):
    job_id, port = _job_id_with_free_port()
    envs = []
    for procid in range(2):
        env = _base_env()
        env.update({"SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid), "SLURM_NTASKS": "2",
                    "SLURM_STEP_ID": "0", "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": "localhost",
                    "SLURM_NODELIST": "localhost"})
        envs.append(env)
    results, shared, private = _run_pair(tmp_path, envs)
    for rank, r in results.items():
        assert r["local_rank"] == rank
        assert r["env"] == {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                            "MASTER_ADDR": "localhost", "MASTER_PORT": str(port)}
    _check_pair(results, shared, private)


def test_the_same_checks_under_torchrun(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results, shared, private = tmp_path / "results", tmp_path / "shared", tmp_path / "private"
    for folder in (results, shared, private):
        folder.mkdir()
    (private / "blocker").write_text("a file where a folder should be")
    env = _base_env()
    env.update({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "1"})  # ignored
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={port}", WORKER, str(results), str(shared), str(private)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    out = {}
    for rank in range(2):
        with open(results / f"rank{rank}.json") as fh:
            out[rank] = json.load(fh)
    assert [out[r]["env"]["MASTER_PORT"] for r in range(2)] == [str(port)] * 2
    _check_pair(out, shared, private)
