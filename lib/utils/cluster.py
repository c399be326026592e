"""SLURM without scontrol: compressed node lists, the variables of a task that ``srun`` started, requeueing.

Nothing here talks to torch.distributed (``mdeq.utils.distributed`` does); these are pure functions of the
environment, so that they can be tested with a faked SLURM environment on any machine.

Two ways to start a run under SLURM (docs/clusters.md; scripts/slurm/train.sbatch):

- ``srun`` starts one ``torchrun`` per node, which starts one process per GPU and sets RANK, WORLD_SIZE, ...;
  nothing here is used.
- ``srun`` starts one task per GPU directly. :func:`slurm_launch_env` translates SLURM_PROCID, SLURM_LOCALID,
  SLURM_NTASKS and the node list into torchrun's variables, and :func:`adopt_slurm_env` writes them into the
  environment before the process group starts.
"""
from __future__ import annotations

import itertools
import logging
import os
import re
import subprocess
from typing import Callable, Dict, List, Mapping, MutableMapping, Optional

logger = logging.getLogger(__name__)

#: The node-list variables whose first host runs rank 0, in order of preference.
SLURM_NODELIST_ENV = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
#: The rendezvous port when MASTER_PORT is not set: SLURM_PORT_BASE + SLURM_JOB_ID % SLURM_PORT_SPAN, a port below
#: Linux's ephemeral range that is the same in every task of a job and usually differs between jobs on a node.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 12000, 20000
DEFAULT_MASTER_PORT = 29500


def expand_nodelist(nodelist: str) -> List[str]:
    """Expands SLURM's compressed host list, as ``scontrol show hostnames`` does, without calling scontrol.

    ``"node[01-03,07],gpu5"`` -> ``["node01", "node02", "node03", "node07", "gpu5"]``. Ranges keep the zero
    padding of their first number; a name with several bracket groups (``"r[1-2]n[1-2]"``) gives every
    combination, the last group varying fastest.

    Args:
        nodelist: the value of SLURM_JOB_NODELIST or a similar variable.

    Returns:
        The host names, in order.

    Raises:
        ValueError: for an empty list, unbalanced brackets or a range that is not ``A-B`` with A <= B.
    """
    text = nodelist.strip()
    if not text:
        raise ValueError("the SLURM node list is empty")
    hosts: List[str] = []
    for item in _split_top_level(text, nodelist):
        parts = re.split(r"(\[[^\[\]]*\])", item)  # "a[1-2]b[3]" -> ["a", "[1-2]", "b", "[3]", ""]
        choices = []
        for part in parts:
            if part.startswith("["):
                choices.append(_expand_brackets(part[1:-1], nodelist))
            elif "[" in part or "]" in part:
                raise ValueError(f"unbalanced brackets in the SLURM node list {nodelist!r}")
            else:
                choices.append([part])
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    return hosts


def _split_top_level(text: str, original: str) -> List[str]:
    """Splits at the commas that are outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"nested brackets in the SLURM node list {original!r}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced brackets in the SLURM node list {original!r}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced brackets in the SLURM node list {original!r}")
    items.append(text[start:])
    if any(not item.strip() for item in items):
        raise ValueError(f"an empty host name in the SLURM node list {original!r}")
    return [item.strip() for item in items]


def _expand_brackets(body: str, original: str) -> List[str]:
    """``"01-03,07"`` -> ``["01", "02", "03", "07"]``."""
    out: List[str] = []
    for piece in body.split(","):
        piece = piece.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", piece)
        if match is None:
            raise ValueError(f"cannot read the range {piece!r} in the SLURM node list {original!r}")
        first, last = match.group(1), match.group(2) or match.group(1)
        if int(last) < int(first):
            raise ValueError(f"the range {piece!r} in the SLURM node list {original!r} runs backwards")
        width = len(first)
        out.extend(str(n).zfill(width) for n in range(int(first), int(last) + 1))
    return out


def slurm_launch_env(environ: Mapping[str, str]) -> Optional[Dict[str, str]]:
    """torchrun's variables for a process that ``srun`` started directly (one task per GPU, no torchrun).

    Applies only when neither RANK nor WORLD_SIZE is set (torchrun's variables win, which also covers torchrun
    started by srun once per node), the process is a task of a job step (SLURM_STEP_ID is set: the batch script
    itself, which also has SLURM_PROCID=0 and the job's SLURM_NTASKS, is not a task), and the step has more
    than one task. Then RANK = SLURM_PROCID, WORLD_SIZE = SLURM_STEP_NUM_TASKS (else SLURM_NTASKS), LOCAL_RANK =
    SLURM_LOCALID, MASTER_ADDR = MASTER_ADDR if set, else the first host of the step's (else the job's) node
    list, which runs task 0 under SLURM's default block distribution, and MASTER_PORT = MASTER_PORT if set, else
    ``SLURM_PORT_BASE + SLURM_JOB_ID % SLURM_PORT_SPAN``.

    Args:
        environ: the process environment (``os.environ``).

    Returns:
        The five variables as strings, or None when SLURM's variables do not apply.

    Raises:
        ValueError: when the SLURM variables are there but incomplete or inconsistent.
    """
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return None
    if "SLURM_PROCID" not in environ or not ("SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ):
        return None
    world_text = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or environ.get("SLURM_NPROCS")
    if not world_text:
        return None
    try:
        rank, world = int(environ["SLURM_PROCID"]), int(world_text)
        local = int(environ.get("SLURM_LOCALID", "0"))
    except ValueError as exc:
        raise ValueError(f"cannot read SLURM's task variables ({exc}); start the job with srun or torchrun") from exc
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise ValueError(f"SLURM_PROCID {rank} is outside the {world} tasks of the step; start one task per GPU "
                         f"with srun --ntasks-per-node=GPUS")
    master = environ.get("MASTER_ADDR")
    if not master:
        nodelist = next((environ[k] for k in SLURM_NODELIST_ENV if environ.get(k)), None)
        if nodelist is None:
            raise ValueError("srun started this process but no SLURM_JOB_NODELIST names the hosts; set MASTER_ADDR "
                             "to the host of task 0")
        master = expand_nodelist(nodelist)[0]
    port = environ.get("MASTER_PORT") or str(slurm_port(environ.get("SLURM_JOB_ID", "")))
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local), "MASTER_ADDR": master,
            "MASTER_PORT": port}


def slurm_port(job_id: str) -> int:
    """The rendezvous port of a SLURM job: the same in all its tasks, derived from SLURM_JOB_ID."""
    digits = re.match(r"\d+", job_id.strip())
    if digits is None:
        return DEFAULT_MASTER_PORT
    return SLURM_PORT_BASE + int(digits.group(0)) % SLURM_PORT_SPAN


def adopt_slurm_env(environ: Optional[MutableMapping[str, str]] = None) -> bool:
    """Writes :func:`slurm_launch_env`'s variables into the environment (once); returns whether it did.

    Called by :func:`local_rank`, :func:`launched_world_size` and :func:`init_distributed`, so that a process
    started by srun finds its GPU and joins the process group as a torchrun worker would.
    """
    environ = os.environ if environ is None else environ
    values = slurm_launch_env(environ)
    if values is None:
        return False
    environ.update(values)
    logger.info("started by srun: rank %s of %s, local rank %s (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID), "
                "rendezvous at %s:%s", values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"],
                values["MASTER_ADDR"], values["MASTER_PORT"])
    return True


def launcher_name(environ: Optional[Mapping[str, str]] = None) -> str:
    """Which launcher started this process, for the log: "torchrun" (also the legacy launcher, which runs on
    torchrun's agent), "srun" (after :func:`adopt_slurm_env`), "environment" (RANK/WORLD_SIZE set by hand or by
    another tool) or "none" (a single process)."""
    environ = os.environ if environ is None else environ
    if "TORCHELASTIC_RUN_ID" in environ:
        return "torchrun"
    if int(environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return "none"
    from_slurm = ("SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ) and \
        environ.get("RANK") == environ.get("SLURM_PROCID")
    return "srun" if from_slurm else "environment"


def requeue_job(environ: Optional[Mapping[str, str]] = None,
                run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> bool:
    """Asks SLURM to put this job back in the queue (``scontrol requeue SLURM_JOB_ID``).

    For a job submitted with ``--requeue`` that received its warning signal (``--signal``) before the time limit:
    after the checkpoint is written, the requeued job starts again with the same command and resumes from it.
    (Preemption with PreemptMode=REQUEUE requeues the job without this.) Does nothing outside a SLURM job.

    Args:
        environ: the process environment (``os.environ``).
        run: what runs the command (``subprocess.run``; replaced in tests).

    Returns:
        Whether scontrol accepted the request.
    """
    environ = os.environ if environ is None else environ
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id:
        return False
    try:
        result = run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("could not requeue SLURM job %s: %s", job_id, exc)
        return False
    if result.returncode != 0:
        logger.warning("scontrol requeue %s failed (exit %d): %s", job_id, result.returncode,
                       (result.stderr or result.stdout or "").strip())
        return False
    logger.info("requeued SLURM job %s", job_id)
    return True
