"""SLURM without a cluster: compressed node lists, the variables of a task that srun started (a faked SLURM
environment), torchrun's variables winning over SLURM's, and requeueing through scontrol (a faked runner)."""
import os
import subprocess

import pytest

from mdeq.utils import cluster
from mdeq.utils import distributed as du

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def srun_task(procid, ntasks, localid, nodelist="gpu[07-08]", job_id="4242", **extra):
    """The variables srun gives task ``procid`` of a step (those this project reads)."""
    env = {"SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks), "SLURM_LOCALID": str(localid),
           "SLURM_STEP_ID": "0", "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": nodelist,
           "SLURM_NODELIST": nodelist}
    env.update(extra)
    return env


@pytest.fixture
def clean_env(monkeypatch):
    """A process environment without any launcher variable (and restored after the test)."""
    for key in list(os.environ):
        if key.startswith("SLURM_") or key in LAUNCH_ENV or key == "TORCHELASTIC_RESTART_COUNT":
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.mark.parametrize("text, hosts", [
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("gpu5", ["gpu5"]),
    ("a1,b2", ["a1", "b2"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),  # the padding of the first number, then wider numbers
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("rack[1-2]-n[3,5]", ["rack1-n3", "rack1-n5", "rack2-n3", "rack2-n5"]),
    ("gpu-a100-[2-3].cluster", ["gpu-a100-2.cluster", "gpu-a100-3.cluster"]),
    (" node[1] ", ["node1"]),
])
def test_compressed_node_lists_expand_like_scontrol_show_hostnames(text, hosts):
    assert cluster.expand_nodelist(text) == hosts


@pytest.mark.parametrize("text, words", [
    ("", "empty"), ("node[01-03", "unbalanced"), ("node]1", "unbalanced"), ("node[3-1]", "backwards"),
    ("node[a-b]", "cannot read"), ("n[[1]]", "nested"), ("a,,b", "empty host"),
])
def test_unreadable_node_lists_are_errors_that_say_why(text, words):
    with pytest.raises(ValueError, match=words):
        cluster.expand_nodelist(text)


def test_a_task_started_by_srun_gets_rank_world_local_rank_and_the_first_host():
    env = srun_task(procid=5, ntasks=8, localid=1, nodelist="gpu[07-08],cpu1", job_id="123456")
    values = cluster.slurm_launch_env(env)
    assert values == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                      "MASTER_PORT": str(12000 + 123456 % 20000)}
    # every task of the job computes the same rendezvous address and port
    others = [cluster.slurm_launch_env(srun_task(p, 8, p % 4, nodelist="gpu[07-08],cpu1", job_id="123456"))
              for p in range(8)]
    assert {(v["MASTER_ADDR"], v["MASTER_PORT"]) for v in others} == {("gpu07", "15456")}
    assert [v["RANK"] for v in others] == [str(p) for p in range(8)]
    # another job gets another port; the port is a valid one below the ephemeral range
    port = int(cluster.slurm_launch_env(srun_task(0, 2, 0, job_id="123457"))["MASTER_PORT"])
    assert port == 15457 and 1024 < port < 32768


def test_the_step_node_list_and_task_count_come_before_the_job_wide_ones():
    # a step on the second and third node of a three-node job, with 8 of the job's 12 tasks
    env = srun_task(0, 12, 0, nodelist="n[1-3]", SLURM_STEP_NODELIST="n[2-3]", SLURM_STEP_NUM_TASKS="8")
    values = cluster.slurm_launch_env(env)
    assert values["MASTER_ADDR"] == "n2" and values["WORLD_SIZE"] == "8"
    # only SLURM_NODELIST (older SLURM versions)
    env = srun_task(1, 2, 1)
    del env["SLURM_JOB_NODELIST"]
    env["SLURM_NODELIST"] = "old[3-4]"
    assert cluster.slurm_launch_env(env)["MASTER_ADDR"] == "old3"


def test_master_address_and_port_from_the_environment_win():
    env = srun_task(1, 2, 1, MASTER_ADDR="10.0.0.7", MASTER_PORT="23456")
    values = cluster.slurm_launch_env(env)
    assert values["MASTER_ADDR"] == "10.0.0.7" and values["MASTER_PORT"] == "23456"
    # no job id to derive a port from: torch's usual default
    env = srun_task(1, 2, 1)
    del env["SLURM_JOB_ID"]
    assert cluster.slurm_launch_env(env)["MASTER_PORT"] == "29500"


@pytest.mark.parametrize("torchrun_vars", [
    {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0"},  # torchrun started by srun once per node
    {"WORLD_SIZE": "1"},
    {"RANK": "3"},
])
def test_torchrun_variables_win_over_slurm(torchrun_vars):
    env = dict(srun_task(1, 2, 1), **torchrun_vars)
    assert cluster.slurm_launch_env(env) is None
    before = dict(env)
    assert cluster.adopt_slurm_env(env) is False and env == before


def test_no_srun_task_no_translation():
    # the batch script itself: SLURM_PROCID=0 and the job's task count, but no job step
    batch = srun_task(0, 8, 0)
    del batch["SLURM_STEP_ID"]
    assert cluster.slurm_launch_env(batch) is None
    # a step of one task (srun python ..., or an interactive srun --pty shell)
    assert cluster.slurm_launch_env(srun_task(0, 1, 0)) is None
    # no SLURM at all
    assert cluster.slurm_launch_env({"HOME": "/root"}) is None


def test_inconsistent_slurm_variables_are_errors():
    with pytest.raises(ValueError, match="outside the 2 tasks"):
        cluster.slurm_launch_env(srun_task(2, 2, 0))
    with pytest.raises(ValueError, match="cannot read SLURM"):
        cluster.slurm_launch_env(srun_task("x", 2, 0))
    env = srun_task(0, 2, 0)
    del env["SLURM_JOB_NODELIST"], env["SLURM_NODELIST"]
    with pytest.raises(ValueError, match="set MASTER_ADDR"):
        cluster.slurm_launch_env(env)


def test_the_distributed_setup_reads_srun_variables_from_the_process_environment(clean_env):
    for key, value in srun_task(procid=3, ntasks=4, localid=1, nodelist="node[01-02]", job_id="77").items():
        clean_env.setenv(key, value)
    assert du.local_rank() == 1
    assert du.launched_world_size() == 4
    assert os.environ["RANK"] == "3" and os.environ["MASTER_ADDR"] == "node01"
    assert os.environ["MASTER_PORT"] == "12077"
    # the legacy --local_rank argument does not override srun's local id once it is in the environment
    assert du.local_rank(arg_local_rank=0) == 1


def test_torchrun_variables_in_the_process_environment_win(clean_env):
    for key, value in srun_task(procid=3, ntasks=4, localid=1).items():
        clean_env.setenv(key, value)
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29511"}.items():
        clean_env.setenv(key, value)
    assert du.local_rank() == 0 and du.launched_world_size() == 2
    assert os.environ["RANK"] == "0" and os.environ["MASTER_ADDR"] == "127.0.0.1"


def test_without_any_launcher_one_process(clean_env):
    assert du.launched_world_size() == 1 and du.local_rank() == 0 and du.local_rank(arg_local_rank=2) == 2
    assert "RANK" not in os.environ


class FakeRun:
    def __init__(self, returncode=0, error=None):
        self.calls, self.returncode, self.error = [], returncode, error

    def __call__(self, args, **kwargs):
        self.calls.append(list(args))
        if self.error is not None:
            raise self.error
        return subprocess.CompletedProcess(args, self.returncode, stdout="", stderr="Invalid job id")


def test_requeue_asks_scontrol_for_this_job():
    run = FakeRun()
    assert cluster.requeue_job({"SLURM_JOB_ID": "991"}, run=run) is True
    assert run.calls == [["scontrol", "requeue", "991"]]


def test_requeue_outside_slurm_or_refused_reports_false(caplog):
    run = FakeRun()
    assert cluster.requeue_job({}, run=run) is False and run.calls == []
    assert cluster.requeue_job({"SLURM_JOB_ID": "5"}, run=FakeRun(returncode=1)) is False
    assert "Invalid job id" in caplog.text
    assert cluster.requeue_job({"SLURM_JOB_ID": "5"}, run=FakeRun(error=FileNotFoundError("scontrol"))) is False


def test_the_launcher_is_named_for_the_log():
    assert cluster.launcher_name({}) == "none"
    assert cluster.launcher_name({"WORLD_SIZE": "1"}) == "none"
    assert cluster.launcher_name({"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2"}) == "torchrun"
    env = srun_task(1, 2, 1)
    assert cluster.launcher_name(env) == "none"  # before the translation
    assert cluster.adopt_slurm_env(env) is True and cluster.launcher_name(env) == "srun"
    assert cluster.launcher_name({"RANK": "1", "WORLD_SIZE": "2"}) == "environment"
