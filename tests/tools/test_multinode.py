"""Multi-node for real, on one machine: two torchrun "nodes" of one process each against one node of two
processes.

The same tiny Fashion-MNIST training (unrolled then equilibrium steps, random augmentation and dropout drawn by
every rank from its own generators) is run as ``torchrun --nproc_per_node=2`` and as two torchrun agents
(``--nnodes=2 --nproc_per_node=1``) that meet through a c10d rendezvous on localhost, the way the SLURM template
starts one agent per node; then cls_valid evaluates the result, once on one node and once on two nodes started
in the static form (``--node_rank=K --master_addr --master_port``). The two-node runs must give bit-identical
weights and the same evaluation: the number of nodes only changes how the processes find each other.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import torch

SUB = os.path.join("fashion_mnist", "cls_mdeq_quick")
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MDEQ_TRACEBACK",
              "TORCHELASTIC_RESTART_COUNT")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in list(env):
        if key in LAUNCH_ENV or key.startswith("SLURM_"):
            del env[key]
    return env


def _launch_nodes(kit, tmp_path, name, node_args, tool_argv, timeout=300):
    """Starts one torchrun agent per entry of node_args at once (each a node); returns their outputs."""
    procs, logs = [], []
    for k, args in enumerate(node_args):
        log_path = str(tmp_path / f"{name}_node{k}.txt")
        fh = open(log_path, "w")
        logs.append((log_path, fh))
        procs.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run"] + args + tool_argv,
                                      cwd=kit.REPO, env=_env(), stdout=fh, stderr=subprocess.STDOUT,
                                      start_new_session=True))
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
        for _, fh in logs:
            fh.close()
    outputs = []
    for proc, (log_path, _) in zip(procs, logs):
        with open(log_path, errors="replace") as fh:
            text = fh.read()
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{text[-4000:]}"
        outputs.append(text)
    return outputs


def _one_node():
    return [["--nnodes=1", "--nproc_per_node=2", f"--master_port={_port()}"]]


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _c10d_nodes(run_id):
    endpoint = f"127.0.0.1:{_port()}"
    return [["--nnodes=2", "--nproc_per_node=1", f"--node_rank={k}", "--rdzv_backend=c10d",
             f"--rdzv_endpoint={endpoint}", f"--rdzv_id={run_id}", f"--rdzv_conf=is_host={int(k == 0)}"]
            for k in range(2)]


def _static_nodes():
    port = _port()
    return [["--nnodes=2", "--nproc_per_node=1", f"--node_rank={k}", "--master_addr=127.0.0.1",
             f"--master_port={port}"] for k in range(2)]


def _run_opts(kit, root, tmp_path, name, pretrain_steps):
    """One epoch of the tiny model, global batch 8 = 2 x 4 (two processes of 4 images), random augmentation."""
    return kit.TINY_MODEL + [
        "DATASET.ROOT", root, "OUTPUT_DIR", str(tmp_path / f"{name}_out"), "LOG_DIR", str(tmp_path / f"{name}_log"),
        "TRAIN.BATCH_SIZE_PER_GPU", "4", "GPUS", "(0, 1)", "TEST.BATCH_SIZE_PER_GPU", "4", "TRAIN.END_EPOCH", "1",
        "TRAIN.PRETRAIN_STEPS", pretrain_steps, "SEED", "0", "DETERMINISTIC", "True", "DEVICE", "cpu",
        "DATASET.AUGMENT", "True", "TENSORBOARD", "False"]


def test_two_localhost_nodes_train_and_evaluate_like_one_node_with_two_processes(kit, tmp_path):
    root = kit.write_fashion_mnist(str(tmp_path / "fmnist"), n_train=24, n_test=11)

    def opts(name):
        return _run_opts(kit, root, tmp_path, name, "2") + ["MODEL.DROPOUT", "0.25"]

    train = [os.path.join("tools", "cls_train.py"), "--cfg", kit.FASHION_CFG]
    one = _launch_nodes(kit, tmp_path, "one_node", _one_node(), train + opts("one"))
    two = _launch_nodes(kit, tmp_path, "two_nodes", _c10d_nodes("mdeq-two-nodes"), train + opts("two"))
    assert "2 process(es)" in one[0]
    assert "2 process(es)" in "".join(two)  # each node started one process, and they formed one group of two

    # the same steps (24 images / 2 ranks / batch 4: 3 steps, unrolled then equilibrium), the same weights
    logs = {name: kit.read_log(str(tmp_path / f"{name}_log" / SUB), "train") for name in ("one", "two")}
    steps = {name: kit.train_lines(text) for name, text in logs.items()}
    assert [(s["i"], s["total"], s["mode"]) for s in steps["two"]] == [
        ("0", "3", "unrolled"), ("1", "3", "unrolled"), ("2", "3", "equilibrium")]
    assert [s["loss"] for s in steps["two"]] == [s["loss"] for s in steps["one"]]
    finals = {name: torch.load(str(tmp_path / f"{name}_out" / SUB / "final_state.pth.tar"), weights_only=True)
              for name in ("one", "two")}
    assert set(finals["one"]) == set(finals["two"])
    different = [k for k in finals["one"] if not torch.equal(finals["one"][k], finals["two"][k])]
    assert not different, different[:5]
    # three optimizer steps were taken (the comparison is not between two untouched models)
    ckpt = torch.load(str(tmp_path / "two_out" / SUB / "checkpoint.pth.tar"), weights_only=True)
    assert ckpt["lr_scheduler"]["last_epoch"] == 3 and ckpt["optimizer"]["state"]
    # the validation at the end of training: identical lines
    (t_one,), (t_two,) = kit.test_lines(logs["one"])[-1:], kit.test_lines(logs["two"])[-1:]
    assert {k: t_two[k] for k in ("loss", "top1", "top5", "count")} == \
           {k: t_one[k] for k in ("loss", "top1", "top5", "count")}
    assert int(t_two["count"]) == 11  # uneven shards of an odd split, nothing padded

    # cls_valid on the two-node result: one node of two processes against two nodes (static rendezvous)
    weights = str(tmp_path / "two_out" / SUB / "final_state.pth.tar")
    valid = [os.path.join("tools", "cls_valid.py"), "--cfg", kit.FASHION_CFG, "--testModel", weights]
    _launch_nodes(kit, tmp_path, "valid_one", _one_node(), valid + opts("valid_one"))
    _launch_nodes(kit, tmp_path, "valid_two", _static_nodes(), valid + opts("valid_two"))
    (v_one,) = kit.test_lines(kit.read_log(str(tmp_path / "valid_one_log" / SUB), "valid"))
    (v_two,) = kit.test_lines(kit.read_log(str(tmp_path / "valid_two_log" / SUB), "valid"))
    assert {k: v_two[k] for k in ("loss", "top1", "top5", "count")} == \
           {k: v_one[k] for k in ("loss", "top1", "top5", "count")}
    assert v_two["loss"] == t_two["loss"] and v_two["count"] == "11"



# ------------------------------------------------------------------------------- the SLURM templates, faked
FAKE_SRUN = r"""#!/bin/bash
# srun for one machine: every "node" of the allocation is this machine; starts SLURM_NNODES x
# SLURM_NTASKS_PER_NODE copies of the command with the variables srun gives its tasks.
while [[ "$1" == --* ]]; do shift; done
total=$(( SLURM_NNODES * SLURM_NTASKS_PER_NODE ))
pids=()
for (( i = 0; i < total; i++ )); do
  SLURM_PROCID=$i SLURM_LOCALID=$(( i % SLURM_NTASKS_PER_NODE )) SLURM_NODEID=$(( i / SLURM_NTASKS_PER_NODE )) \
  SLURM_NTASKS=$total SLURM_STEP_ID=0 SLURM_STEP_NODELIST="$SLURM_JOB_NODELIST" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""
FAKE_SCONTROL = r"""#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then
  "$FAKE_PYTHON" -c "import sys; from mdeq.utils.cluster import expand_nodelist as e; print(*e(sys.argv[1]), sep='\n')" \
      "$3"
else
  echo "scontrol $*" >> "$FAKE_RECORD"
fi
"""
FAKE_SCANCEL = r"""#!/bin/bash
echo "scancel $*" >> "$FAKE_RECORD"
"""


def _fake_slurm(tmp_path):
    folder = tmp_path / "fake_slurm_bin"
    folder.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("scancel", FAKE_SCANCEL)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return str(folder)


def _slurm_job_id():
    """A job id whose derived rendezvous port (12000 + id % 20000, as the templates and mdeq.utils.cluster
    compute it) is free now."""
    for job_id in range(4000 + os.getpid() % 1000, 24000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 12000 + job_id % 20000))
            except OSError:
                continue
        return job_id
    raise AssertionError("no free port")


def _sbatch(kit, tmp_path, name, template, per_node, overrides, signal_when=None, timeout=300):
    """Runs a template with bash as sbatch would on two one-GPU "nodes" of this machine; returns (output,
    the scontrol/scancel calls it made). With signal_when, sends SIGUSR1 to the script once its output holds
    that text (what --signal=B:USR1 does before the time limit)."""
    record = tmp_path / f"{name}_slurm_calls.txt"
    record.write_text("")
    job_id = _slurm_job_id()
    env = _env()
    env.update({"PATH": _fake_slurm(tmp_path) + os.pathsep + env["PATH"], "FAKE_PYTHON": sys.executable,
                "FAKE_RECORD": str(record), "PYTHON": sys.executable, "CFG": kit.FASHION_CFG,
                "TOOL": os.path.join("tools", "cls_train.py"), "GPUS_PER_NODE": "1", "SLURM_JOB_ID": str(job_id),
                "SLURM_JOB_NODELIST": "localhost", "SLURM_NODELIST": "localhost", "SLURM_NNODES": "2",
                "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_CPUS_PER_TASK": "1"})
    log_path = tmp_path / f"{name}.txt"
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(["bash", os.path.join("scripts", "slurm", template)] + overrides, cwd=kit.REPO,
                                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if signal_when is not None:
                deadline = time.time() + timeout
                while signal_when not in log_path.read_text(errors="replace"):
                    assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-4000:]
                    time.sleep(0.05)
                os.kill(proc.pid, signal.SIGUSR1)
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    output = log_path.read_text(errors="replace")
    assert proc.returncode == 0, output[-4000:]
    return output, record.read_text().splitlines(), job_id


def test_the_slurm_templates_train_like_one_node(kit, tmp_path):
    """Both sbatch templates, run by bash with a fake srun/scontrol/scancel that treat this machine as two
    nodes: torchrun once per node (c10d rendezvous on the allocation's first host) and srun starting the
    training processes directly (ranks from SLURM's variables). Both end with the weights of one node with two
    processes. The torchrun template is sent its warning signal during training: it passes the signal on to
    the job step (scancel --signal=USR1), waits for the step to end, and requeues the job."""
    root = kit.write_fashion_mnist(str(tmp_path / "fmnist"), n_train=16, n_test=6)

    def opts(name):
        return _run_opts(kit, root, tmp_path, name, "1")

    _launch_nodes(kit, tmp_path, "one_node", _one_node(),
                  [os.path.join("tools", "cls_train.py"), "--cfg", kit.FASHION_CFG] + opts("one"))
    output, calls, job_id = _sbatch(kit, tmp_path, "torchrun", "train.sbatch", 1, opts("torchrun"),
                                    signal_when="2 process(es)")
    assert f"rendezvous localhost:{12000 + job_id % 20000}" in output
    assert "SIGUSR1: asking the training processes to save and stop" in output
    assert calls == [f"scancel --signal=USR1 {job_id}", f"scontrol requeue {job_id}"]
    assert output.index("training stopped with status 0") > output.index("=> saved checkpoint")  # waited for it
    output, calls, job_id = _sbatch(kit, tmp_path, "srun", "train_srun.sbatch", 1, opts("srun"))
    assert calls == [] and "training ended with status 0" in output
    assert "2 process(es)" in kit.read_log(str(tmp_path / "srun_log" / SUB), "train")
    finals = {name: torch.load(str(tmp_path / f"{name}_out" / SUB / "final_state.pth.tar"), weights_only=True)
              for name in ("one", "torchrun", "srun")}
    for name in ("torchrun", "srun"):
        different = [k for k in finals["one"] if not torch.equal(finals["one"][k], finals[name][k])]
        assert set(finals[name]) == set(finals["one"]) and not different, (name, different[:5])
