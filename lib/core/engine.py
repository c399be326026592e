"""What every tool shares: arguments, devices and processes, folders, loaders, training state and step guards.

Classification and segmentation training both build on these pieces, so there is one copy of the distributed,
checkpoint and logging code.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from yacs.config import CfgNode as CN

from mdeq.config import check_config, get_default_config, update_config
from mdeq.utils import distributed as du
from mdeq.utils.checkpoint import save_checkpoint
from mdeq.utils.logging_utils import setup_logger

logger = logging.getLogger(__name__)


def parse_args(description: str, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The original command line: --cfg, --modelDir, --logDir, --dataDir, --testModel, --percent, the legacy
    launcher's --local_rank / --local-rank, and trailing KEY VALUE overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg", required=True, type=str, help="experiment yaml file")
    parser.add_argument("--modelDir", default="", type=str, help="overrides OUTPUT_DIR (checkpoints)")
    parser.add_argument("--logDir", default="", type=str, help="overrides LOG_DIR (logs, TensorBoard)")
    parser.add_argument("--dataDir", default="", type=str, help="overrides DATA_DIR (prefix of DATASET.ROOT)")
    parser.add_argument("--testModel", default="", type=str, help="overrides TEST.MODEL_FILE")
    parser.add_argument("--percent", default=1.0, type=float, help="fraction of the training set to use")
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", default=None, type=int,
                        help="set by python -m torch.distributed.launch; torchrun uses LOCAL_RANK instead")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides as KEY VALUE pairs, e.g. TRAIN.LR 0.01 DEQ.F_THRES 20")
    return parser.parse_args(argv)


@dataclass
class RunContext:
    """Everything a tool needs to know about where and how it runs."""

    cfg: CN
    device: torch.device
    cfg_name: str
    output_dir: str
    log_dir: str
    writer: Any = None

    @property
    def rank(self) -> int:
        return du.get_rank()

    @property
    def world_size(self) -> int:
        return du.get_world_size()

    @property
    def is_main(self) -> bool:
        return du.is_main_process()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def setup_run(args: argparse.Namespace, phase: str) -> RunContext:
    """Config (yaml + flags + options, checked, frozen), device, process group, seeds, folders, log file."""
    cfg = check_config(update_config(get_default_config(), args))
    cfg.freeze()
    device = du.select_device(cfg.DEVICE, getattr(args, "local_rank", None))
    du.init_distributed(device)
    cfg_name = os.path.splitext(os.path.basename(args.cfg))[0]
    dataset = cfg.DATASET.DATASET.lower()
    output_dir = os.path.join(cfg.OUTPUT_DIR, dataset, cfg_name)
    log_dir = os.path.join(cfg.LOG_DIR, dataset, cfg_name)
    if du.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        os.makedirs(log_dir, exist_ok=True)
    setup_logger(log_dir, phase, cfg_name)
    if cfg.SEED >= 0:
        _seed_everything(cfg.SEED + du.get_rank())
    if cfg.DETERMINISTIC:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.CUDNN.BENCHMARK and not cfg.DETERMINISTIC
        torch.backends.cudnn.deterministic = cfg.CUDNN.DETERMINISTIC or cfg.DETERMINISTIC
        torch.backends.cudnn.enabled = cfg.CUDNN.ENABLED
    if du.is_main_process():
        with open(os.path.join(log_dir, f"{cfg_name}_{phase}_config.yaml"), "w") as fh:
            fh.write(cfg.dump())
    logger.info("device %s, %d process(es), torch %s, %d CPU threads", device, du.get_world_size(),
                torch.__version__, torch.get_num_threads())
    return RunContext(cfg=cfg, device=device, cfg_name=cfg_name, output_dir=output_dir, log_dir=log_dir)


def tensorboard_writer(ctx: RunContext):
    """A TensorBoard writer on rank 0 (None elsewhere, or when TENSORBOARD is off or tensorboardX missing)."""
    if not ctx.is_main or not ctx.cfg.TENSORBOARD:
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # an optional extra: training goes on without scalars
        logger.warning("tensorboardX is not installed; no TensorBoard scalars are written")
        return None
    return SummaryWriter(logdir=ctx.log_dir)


def wrap_model(model: nn.Module, ctx: RunContext, sync_bn: bool = False) -> nn.Module:
    """Moves the model to the device and wraps it in DistributedDataParallel when several processes run."""
    model = model.to(ctx.device)
    if not du.is_distributed():
        return model
    if sync_bn and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare network inside a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class ShardSampler(Sampler[int]):
    """Deterministic, resumable, distributed sampler.

    The order of an epoch depends only on (seed, epoch); each rank takes every world_size-th index. In training
    the order is padded so that all ranks run the same number of steps; in evaluation nothing is padded, so the
    shards cover the dataset exactly once. ``set_start(n)`` skips this rank's first n samples (mid-epoch resume).
    """

    def __init__(self, length: int, shuffle: bool, seed: int = 0, pad: bool = True,
                 rank: Optional[int] = None, world_size: Optional[int] = None) -> None:
        self.length, self.shuffle, self.seed, self.pad = length, shuffle, seed, pad
        self.rank = du.get_rank() if rank is None else rank
        self.world_size = du.get_world_size() if world_size is None else world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        self.start = start

    def _indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        if self.pad and self.world_size > 1 and self.length > 0:
            total = math.ceil(self.length / self.world_size) * self.world_size
            order = (order * math.ceil(total / self.length))[:total]  # repeats when world_size > length
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.start)


def subset_percent(dataset: Dataset, percent: float) -> Dataset:
    """The first ``percent`` of a dataset (PERCENT / --percent), as the original does."""
    if percent >= 1.0:
        return dataset
    n = max(1, int(len(dataset) * percent))
    return torch.utils.data.Subset(dataset, range(n))


def make_loader(dataset: Dataset, ctx: RunContext, batch_size: int, train: bool) -> DataLoader:
    """A DataLoader over this rank's shard; training loaders shuffle (TRAIN.SHUFFLE) and drop the last partial
    batch only when that batch would be of size 1 (BatchNorm needs two samples)."""
    cfg = ctx.cfg
    seed = cfg.SEED if cfg.SEED >= 0 else 0
    sampler = ShardSampler(len(dataset), shuffle=train and cfg.TRAIN.SHUFFLE, seed=seed, pad=train)
    drop_last = train and len(sampler) % batch_size == 1
    workers = cfg.WORKERS
    # Every new iterator draws a worker base seed from the loader's generator; from its own generator rather
    # than the global one, so that starting an iterator mid-epoch (resume) leaves the global state as saved.
    generator = torch.Generator().manual_seed(torch.initial_seed())
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=cfg.PIN_MEMORY and ctx.device.type == "cuda", drop_last=drop_last,
                        persistent_workers=workers > 0, generator=generator)
    if train and len(loader) == 0:
        raise ValueError(
            f"training would run no step: {len(dataset)} training sample(s) over {ctx.world_size} process(es) give "
            f"each process {len(sampler)} sample(s), and a batch of one sample is dropped (BatchNorm needs two). "
            f"Use more training data (PERCENT, DATASET.TRAIN_SET) or fewer processes; TRAIN.BATCH_SIZE_PER_GPU "
            f"({batch_size}) is per process.")
    return loader


# ------------------------------------------------------------------------------------------- training state
def rng_state() -> Dict[str, Any]:
    """The random generators' states in a form that loads with weights_only (tensors and plain lists)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restores what :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_rng_states() -> List[Dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order (a collective: every rank must call it at the same point)."""
    own = rng_state()
    if not du.is_distributed():
        return [own]
    gathered: List[Any] = [None] * du.get_world_size()
    torch.distributed.all_gather_object(gathered, own)
    return gathered


def restore_rng_state(ckpt: Dict[str, Any]) -> None:
    """Restores this rank's random generators from a training checkpoint: its own state when the checkpoint
    holds one per rank for the same number of processes, else the state saved by rank 0."""
    per_rank, world, rank = ckpt.get("rng_per_rank"), du.get_world_size(), du.get_rank()
    if per_rank and len(per_rank) == world:
        set_rng_state(per_rank[rank])
    elif "rng" in ckpt:
        if world > 1:
            logger.warning("the checkpoint holds no random-generator state per process for %d processes; every "
                           "process continues from rank 0's (random augmentation and dropout will differ from "
                           "an uninterrupted run)", world)
        set_rng_state(ckpt["rng"])


class TrainingDiverged(RuntimeError):
    """Raised after too many consecutive bad steps; the last good state has been checkpointed."""


class BadStepGuard:
    """Skips steps whose loss or gradients are not finite (so no NaN reaches the weights or the optimizer state)
    and stops training after ``max_bad`` consecutive bad steps."""

    def __init__(self, max_bad: int) -> None:
        self.max_bad = max_bad
        self.consecutive = 0
        self.total = 0

    def gradients_finite(self, model: nn.Module) -> bool:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return True
        norms = torch._foreach_norm(grads)
        return bool(torch.isfinite(torch.stack(norms)).all())

    def check(self, loss: torch.Tensor, model: nn.Module, diverged: bool = False) -> bool:
        """True when the step may be applied. All ranks agree: DDP has already averaged the gradients, so a bad
        loss on any rank makes every rank's gradients non-finite."""
        ok = bool(torch.isfinite(loss.detach()).all()) and self.gradients_finite(model) and not diverged
        if du.is_distributed():
            flag = torch.tensor([0.0 if ok else 1.0], device=loss.device)
            ok = float(du.all_reduce_sum(flag)) == 0.0
        if ok:
            self.consecutive = 0
        else:
            self.consecutive += 1
            self.total += 1
        return ok

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_bad


def guard_snapshot(model: nn.Module) -> List[torch.Tensor]:
    """Copies of every buffer of the model (BatchNorm running statistics and batch counters), taken before a step."""
    return [b.detach().clone() for b in model.buffers()]


def guard_restore(model: nn.Module, snapshot: List[torch.Tensor]) -> None:
    """Puts back the buffers of a skipped step, so that a bad batch leaves the running statistics as they were."""
    with torch.no_grad():
        for b, saved in zip(model.buffers(), snapshot):
            b.copy_(saved)


def guarded_update(ctx: RunContext, model: nn.Module, optimizer: torch.optim.Optimizer, total_loss: torch.Tensor,
                   info: Dict[str, Any], guard: BadStepGuard, snapshot: List[torch.Tensor], epoch: int, step: int,
                   writer: Any = None) -> bool:
    """Applies the optimizer step of a finished backward pass, or skips it; shared by every training loop.

    A step is skipped when the loss or a gradient is not finite, or (with TRAIN.SKIP_DIVERGED) when the forward
    solve diverged: the gradients are dropped, the buffers are restored from ``snapshot`` and the optimizer state
    is left untouched, so nothing non-finite reaches the weights, the running statistics or the optimizer. Each
    skip is logged with the running counts and written to TensorBoard as ``train/skipped_steps``.

    Returns:
        True when the step was applied.

    Raises:
        TrainingDiverged: after TRAIN.MAX_BAD_STEPS consecutive skipped steps.
    """
    forward = info.get("forward")
    diverged = bool(ctx.cfg.TRAIN.SKIP_DIVERGED and forward and forward["diverged"] > 0)
    if guard.check(total_loss, model, diverged):
        optimizer.step()
        return True
    guard_restore(model, snapshot)
    optimizer.zero_grad(set_to_none=True)
    logger.warning("epoch %d step %d: skipped a step with a non-finite loss or gradient or a diverged solve "
                   "(%d in a row, %d skipped steps in total)", epoch, step, guard.consecutive, guard.total)
    if writer is not None:
        writer.add_scalar("train/skipped_steps", guard.total, step)
    if guard.exhausted:
        raise TrainingDiverged(
            f"{guard.consecutive} consecutive bad steps (non-finite loss or gradients, or diverged solves) at "
            f"epoch {epoch}, step {step}; training stopped (TRAIN.MAX_BAD_STEPS is {guard.max_bad}). Lower "
            f"TRAIN.LR, set TRAIN.CLIP, or raise TRAIN.MAX_BAD_STEPS.")
    return False


def save_last_good(ctx: RunContext, checkpoint: Callable[[], Dict[str, Any]],
                   exc: TrainingDiverged) -> TrainingDiverged:
    """Writes ``checkpoint()`` to ``last_good.pth.tar`` (rank 0) after training diverged; returns the error to
    raise, which names the file and how to continue from it."""
    path = os.path.join(ctx.output_dir, "last_good.pth.tar")
    if ctx.is_main:
        save_checkpoint(checkpoint(), path)
    du.barrier()
    return TrainingDiverged(f"{exc} The last good state (weights, optimizer, schedule) is in {path}; to go on "
                            f"from it, change the settings and pass TRAIN.CHECKPOINT {path}.")
