"""One process of the two-process checks of tests/utils/test_distributed.py, started the way ``srun`` starts a
task (SLURM_* variables only, no RANK/WORLD_SIZE) or the way torchrun does.

    python dist_worker.py RESULT_DIR SHARED_DIR PRIVATE_DIR

Joins the process group through ``mdeq.utils.distributed`` alone, runs a few collectives and the shared-folder
check three times (on a folder both processes see, on PRIVATE_DIR/node<R>, a folder of its own, and on a folder
that cannot be created), and writes what it saw
to RESULT_DIR/rank<R>.json.
"""
import json
import os
import sys

import torch
from torch import nn

from mdeq.utils import distributed as du


def main(result_dir: str, shared: str, private: str) -> None:
    device = du.select_device("cpu")
    local = du.local_rank()
    started = du.init_distributed(device, timeout_minutes=1)
    rank, world = du.get_rank(), du.get_world_size()
    summed = du.all_reduce_sum(torch.tensor([float(rank + 1)])).item()
    gathered = du.all_gather_object({"rank": rank, "pid": os.getpid()})
    token = du.broadcast_object(f"from rank {rank}")

    # SyncBatchNorm in a Gloo group on the CPU: what sync_batchnorm_supported(cpu) predicts
    sync_bn = nn.SyncBatchNorm(2).train()
    try:
        sync_bn(torch.randn(4, 2, 3, 3))
        sync_bn_ran = True
    except ValueError:
        sync_bn_ran = False

    du.check_shared_folder(shared)
    shared_left = sorted(os.listdir(shared))
    own = os.path.join(private, f"node{rank}")  # the same path name that leads to a different folder per node
    try:
        du.check_shared_folder(own, timeout_s=1.0)
        private_error = None
    except du.SharedFolderError as exc:
        private_error = str(exc)
    try:  # a folder rank 0 cannot create: PRIVATE_DIR/blocker is a file
        du.check_shared_folder(os.path.join(private, "blocker", "out"), timeout_s=1.0)
        unwritable_error = None
    except du.SharedFolderError as exc:
        unwritable_error = str(exc)
    du.barrier()  # still in step with each other after the errors: the group works
    result = {
        "started": started, "rank": rank, "world": world, "local_rank": local,
        "env": {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")},
        "sum": summed, "gathered": gathered, "broadcast": token, "sync_bn_ran": sync_bn_ran,
        "sync_bn_supported": du.sync_batchnorm_supported(device), "shared_left": shared_left,
        "private_error": private_error, "unwritable_error": unwritable_error,
    }
    du.cleanup()
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(*sys.argv[1:4])
