"""The only module that talks to torch.distributed.

Works with and without an initialised process group: ``get_rank()`` is 0 and ``get_world_size()`` is 1 in a
single process. Launchers: ``torchrun`` (environment variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)
and the legacy ``python -m torch.distributed.launch`` (which also passes ``--local_rank``/``--local-rank``).
"""
from __future__ import annotations

import datetime
import logging
import os
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


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
    """The number of processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank(arg_local_rank: Optional[int] = None) -> int:
    """LOCAL_RANK from the environment, else the legacy ``--local_rank`` argument, else 0."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return int(arg_local_rank or 0)


def select_device(name: str = "auto", arg_local_rank: Optional[int] = None) -> torch.device:
    """DEVICE config value -> torch.device; CUDA picks this process's local GPU."""
    name = name.lower()
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("DEVICE is 'cuda' but no CUDA device is available; use DEVICE auto or cpu")
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
        os.environ["MASTER_PORT"] = "29500"
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


def all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order (a collective: every rank must call it at the same point)."""
    if not is_distributed():
        return [obj]
    gathered: list = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


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
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            logger.info("BatchNorm statistics are synchronised across the %d processes (SyncBatchNorm)",
                        get_world_size())
        else:
            logger.info("BatchNorm statistics stay per process: SyncBatchNorm needs NCCL on CUDA devices")
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)
