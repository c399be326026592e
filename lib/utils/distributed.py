"""The only module that talks to torch.distributed.

Works with and without an initialised process group: ``get_rank()`` is 0 and ``get_world_size()`` is 1 in a
single process. Launchers: ``torchrun`` (environment variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
the legacy ``python -m torch.distributed.launch`` (which also passes ``--local_rank``/``--local-rank``), and
SLURM's ``srun`` starting one task per GPU without torchrun (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS and the
node list are translated into torchrun's variables by :mod:`mdeq.utils.cluster`).
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
import time
import uuid
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from mdeq.utils.cluster import DEFAULT_MASTER_PORT, adopt_slurm_env

logger = logging.getLogger(__name__)


class DeviceUnavailableError(ValueError):
    """The configured DEVICE does not exist on this machine (a user error: the tools print it on one line)."""


class SharedFolderError(ValueError):
    """An output folder that several nodes write to is not the same folder on every node."""


def is_distributed() -> bool:
    """True when a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def launched_world_size() -> int:
    """The number of processes the launcher (torchrun, the legacy launcher or srun) started; 1 without one."""
    adopt_slurm_env()
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank(arg_local_rank: Optional[int] = None) -> int:
    """LOCAL_RANK from the environment (srun's SLURM_LOCALID included), else the legacy ``--local_rank``
    argument, else 0."""
    adopt_slurm_env()
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return int(arg_local_rank or 0)


def select_device(name: str = "auto", arg_local_rank: Optional[int] = None) -> torch.device:
    """DEVICE config value -> torch.device; CUDA picks this process's local GPU.

    Raises:
        DeviceUnavailableError: for DEVICE cuda on a machine without a usable GPU.
    """
    name = name.lower()
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailableError("DEVICE is 'cuda' but no CUDA device is available on this machine; use "
                                     "DEVICE auto or cpu")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        index = local_rank(arg_local_rank) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed(device: torch.device, timeout_minutes: int = 30) -> bool:
    """Initialises the process group when a launcher started several processes; returns whether it did.

    NCCL on GPUs, Gloo on CPU.
    """
    if launched_world_size() <= 1 or is_distributed():
        return is_distributed()
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(DEFAULT_MASTER_PORT)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=timeout_minutes)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        # The elastic agent (torchrun) keeps one key-value store for all attempts of a job; without a prefix of its
        # own, a restarted job (--max-restarts) would read the connection keys of the processes it replaced and
        # fail to connect. Each attempt gets its own prefix.
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"mdeq/attempt_{attempt}", store),
                                rank=rank, world_size=world_size, timeout=timeout)
    logger.info("process group: backend %s, rank %d of %d", backend, get_rank(), get_world_size())
    return True


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums a tensor over all ranks (in place) and returns it; the identity in one process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def sync_batchnorm_supported(device: torch.device) -> bool:
    """Whether ``nn.SyncBatchNorm`` can synchronise batch statistics here: with NCCL on CUDA devices, yes; on the
    CPU (Gloo) torch refuses to run it in a process group, so plain BatchNorm with per-process statistics is
    the fallback there."""
    return device.type == "cuda" and dist.is_available() and dist.is_nccl_available()


def all_gather_object(obj: Any) -> List[Any]:
    """Every rank's picklable object, in rank order (a collective); ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    gathered: List[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def check_shared_folder(path: str, timeout_s: float = 20.0) -> None:
    """Checks that ``path`` is the same folder for every rank (a collective; nothing to do in one process).

    Multi-node training needs OUTPUT_DIR and LOG_DIR on a filesystem that every node sees: rank 0 alone writes
    the checkpoints, and every rank reads them back to resume. Rank 0 creates the folder and writes a file with
    a random token into it; every other rank looks for that file (polling for up to ``timeout_s`` seconds, since
    network filesystems may show a new file to other clients after a delay); the answers are gathered, rank 0
    removes the file, and then every rank raises the same error when one of them did not see it, so that no rank
    waits for the others in a later collective. Every rank returns after the file is removed.

    Args:
        path: the folder to check (as this rank sees it).
        timeout_s: how long a rank waits for the file to appear.

    Raises:
        SharedFolderError: on every rank, when some rank does not see rank 0's file or rank 0 cannot write it.
    """
    if not is_distributed():
        return
    token, problem = None, None
    if is_main_process():
        token = uuid.uuid4().hex
        try:
            os.makedirs(path, exist_ok=True)
            with open(os.path.join(path, f".shared-check-{token}"), "w") as fh:
                fh.write(token)
        except OSError as exc:  # told to every rank, so that none of them waits for rank 0
            problem = f"cannot write into the output folder {path} ({exc.strerror or exc}); check the path and " \
                      f"its permissions"
    token, problem = broadcast_object((token, problem))
    if problem is not None:
        raise SharedFolderError(problem)
    name = os.path.join(path, f".shared-check-{token}")
    seen = is_main_process() or _wait_for_token(path, name, token, timeout_s)
    answers = all_gather_object((get_rank(), socket.gethostname(), seen))
    if is_main_process():
        try:
            os.remove(name)
        except OSError:
            pass
    barrier()  # no rank goes on while the file is still there
    blind = [f"rank {rank} on {host}" for rank, host, ok in answers if not ok]
    if blind:
        raise SharedFolderError(
            f"the output folder {path} is not on a filesystem every node sees ({', '.join(blind)} did not see the "
            f"file rank 0 wrote there); put OUTPUT_DIR/LOG_DIR on a shared filesystem")


def _wait_for_token(folder: str, name: str, token: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.listdir(folder)  # a directory read makes network filesystems revalidate their cached listing
            with open(name) as fh:
                if fh.read() == token:
                    return True
        except OSError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def broadcast_object(obj, src: int = 0):
    """Sends a picklable object from rank ``src`` to all ranks (used for small things such as a step count)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective in several processes)."""
    if not is_distributed():
        return bool(flag)
    box = torch.tensor([1.0 if flag else 0.0], device=device)
    return float(all_reduce_sum(box)) > 0.0


def same_on_all_ranks(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (a collective in several processes)."""
    if not is_distributed():
        return bool(flag)
    box = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(box, src=0)
    return float(box) > 0.0


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare network inside a DistributedDataParallel (or DataParallel) wrapper; the model itself otherwise."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def wrap_model(model: torch.nn.Module, device: torch.device, sync_bn: bool = False) -> torch.nn.Module:
    """Moves ``model`` to ``device`` and, when several processes run, wraps it in DistributedDataParallel.

    With ``sync_bn`` the BatchNorms become SyncBatchNorm where the backend supports it (NCCL on CUDA); on the
    CPU (Gloo) they stay per-process BatchNorms, and the log says so.
    """
    model = model.to(device)
    if not is_distributed():
        return model
    if sync_bn:
        if sync_batchnorm_supported(device):
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            logger.info("BatchNorm: statistics synchronised across the %d processes (SyncBatchNorm, NCCL)",
                        get_world_size())
        else:
            logger.info("BatchNorm: per-process statistics (SyncBatchNorm needs CUDA with NCCL)")
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)
