"""Data for a run: how a step's batch is split over processes and micro-batches, the resumable distributed
sampler and the loaders built on it.

The experiment fixes the global batch, ``TRAIN.BATCH_SIZE_PER_GPU x len(GPUS)`` samples per optimizer step, as
the original project did (one process with DataParallel over GPUS for classification, one process per entry of
GPUS for segmentation). W processes each take 1/W of it; each process splits its share into
``TRAIN.ACCUM_STEPS`` micro-batches whose gradients add up to one step. By default (ACCUM_STEPS 0) the
micro-batch is the original's per-GPU batch wherever that divides evenly, so BatchNorm and the solver see the
same batches as in the original whatever the number of processes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from yacs.config import CfgNode as CN

from mdeq.utils import distributed as du


PERCENT_MODES = ("per_epoch", "fixed")


@dataclass(frozen=True)
class BatchPlan:
    """How the samples of one optimizer step are split.

    Attributes:
        global_batch: samples per optimizer step over all processes.
        world_size: number of processes.
        per_process: samples per step in one process (the training loader's batch).
        accum_steps: micro-batches per step in one process.
    """

    global_batch: int
    world_size: int
    per_process: int
    accum_steps: int

    @property
    def micro_batch(self) -> int:
        """Samples in one micro-batch (the last batch of an epoch may be smaller)."""
        return math.ceil(self.per_process / self.accum_steps)

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.world_size} process(es) x {self.per_process} samples "
                f"per step, in {self.accum_steps} micro-batch(es) of {self.micro_batch}")


def batch_plan(cfg: CN, world_size: int) -> BatchPlan:
    """The split of TRAIN.BATCH_SIZE_PER_GPU x len(GPUS) samples per step over ``world_size`` processes.

    Raises:
        ValueError: the global batch cannot be split evenly over the processes or the micro-batches.
    """
    gpus = max(1, len(cfg.GPUS))
    per_gpu = cfg.TRAIN.BATCH_SIZE_PER_GPU
    global_batch = per_gpu * gpus
    if global_batch % world_size:
        raise ValueError(
            f"the global batch TRAIN.BATCH_SIZE_PER_GPU x len(GPUS) = {per_gpu} x {gpus} = {global_batch} cannot be "
            f"split evenly over {world_size} processes; start a number of processes that divides {global_batch}, "
            f"or change GPUS or TRAIN.BATCH_SIZE_PER_GPU")
    per_process = global_batch // world_size
    accum = cfg.TRAIN.ACCUM_STEPS
    if accum <= 0:  # the original's per-GPU batches, where the processes are fewer than the GPUs it used
        accum = gpus // world_size if gpus % world_size == 0 and gpus > world_size else 1
    if per_process % accum:
        raise ValueError(
            f"TRAIN.ACCUM_STEPS {accum} does not divide the {per_process} samples per step of each of the "
            f"{world_size} process(es) (global batch {global_batch}); choose a divisor of {per_process}")
    return BatchPlan(global_batch, world_size, per_process, accum)


def micro_batches(x: torch.Tensor, accum_steps: int) -> Tuple[torch.Tensor, ...]:
    """Splits a batch along dim 0 into at most ``accum_steps`` pieces, as DataParallel scatters it."""
    return (x,) if accum_steps <= 1 else x.chunk(accum_steps)


class ShardSampler(Sampler[int]):
    """Deterministic, resumable, distributed sampler.

    The order of an epoch depends only on (seed, epoch). In evaluation each rank takes every world_size-th index
    and nothing is padded, so the shards cover the dataset exactly once. In training the order is padded so that
    all ranks run the same number of steps, and with ``block`` (the samples of one step in one process) each
    step's global batch is split into contiguous blocks, one per rank: rank r gets the r-th part of it, which is
    the r-th micro-batch that one process would take of the same global batch. ``set_start(n)`` skips this rank's
    first n samples (mid-epoch resume); ``limit`` ends each epoch after that many of this rank's samples (PERCENT,
    the original's way).
    """

    def __init__(self, length: int, shuffle: bool, seed: int = 0, pad: bool = True,
                 rank: Optional[int] = None, world_size: Optional[int] = None, limit: Optional[int] = None,
                 block: Optional[int] = None) -> None:
        self.length, self.shuffle, self.seed, self.pad, self.limit = length, shuffle, seed, pad, limit
        self.block = block
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
        if self.block and self.world_size > 1:
            group = self.block * self.world_size
            mine = []
            for g in range(0, len(order), group):
                part = order[g:g + group]
                size = len(part) // self.world_size  # the padded order splits evenly
                mine += part[self.rank * size:(self.rank + 1) * size]
        else:
            mine = order[self.rank::self.world_size]
        return mine if self.limit is None else mine[:self.limit]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.start)


def subset_percent(dataset: Dataset, percent: float) -> Dataset:
    """The first ``percent`` of a dataset (PERCENT with TRAIN.PERCENT_MODE fixed)."""
    if percent >= 1.0:
        return dataset
    n = max(1, int(len(dataset) * percent))
    return torch.utils.data.Subset(dataset, range(n))


def _loader(dataset: Dataset, cfg: CN, device: torch.device, batch_size: int, sampler: ShardSampler,
            drop_last: bool) -> DataLoader:
    workers = cfg.WORKERS
    # Every new iterator draws a worker base seed from the loader's generator; from its own generator rather
    # than the global one, so that starting an iterator mid-epoch (resume) leaves the global state as saved.
    generator = torch.Generator().manual_seed(torch.initial_seed())
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=cfg.PIN_MEMORY and device.type == "cuda", drop_last=drop_last,
                      persistent_workers=workers > 0, generator=generator)


def eval_loader(dataset: Dataset, cfg: CN, device: torch.device) -> DataLoader:
    """This rank's shard of an evaluation set (nothing padded or dropped), TEST.BATCH_SIZE_PER_GPU per batch."""
    sampler = ShardSampler(len(dataset), shuffle=False, pad=False)
    return _loader(dataset, cfg, device, cfg.TEST.BATCH_SIZE_PER_GPU, sampler, drop_last=False)


@dataclass
class TrainData:
    """A training loader and the step counts the schedule needs.

    Attributes:
        loader: this rank's loader; one batch is one optimizer step.
        schedule_steps: steps of a full epoch, over which the learning-rate schedule is laid out (with
            PERCENT < 1 in the original's mode, more than the steps actually run per epoch).
    """

    loader: DataLoader
    schedule_steps: int

    @property
    def sampler(self) -> ShardSampler:
        return self.loader.sampler  # type: ignore[return-value]


def train_loader(dataset: Dataset, cfg: CN, device: torch.device, plan: BatchPlan, percent: float = 1.0
                 ) -> TrainData:
    """This rank's training loader: shuffled (TRAIN.SHUFFLE), one step's share of samples per batch.

    PERCENT < 1 either trains each epoch on the first PERCENT of the batches of a freshly shuffled full epoch,
    with the schedule laid out over full epochs (TRAIN.PERCENT_MODE per_epoch, the original), or on the fixed
    first PERCENT of the dataset (fixed). The last partial batch is dropped only when one of its micro-batches
    would hold a single sample (BatchNorm needs two).

    Raises:
        ValueError: the training set gives no step.
    """
    seed = cfg.SEED if cfg.SEED >= 0 else 0
    mode = cfg.TRAIN.PERCENT_MODE
    if mode not in PERCENT_MODES:
        raise ValueError(f"TRAIN.PERCENT_MODE: unknown value {mode!r}; use one of {', '.join(PERCENT_MODES)}")
    if percent < 1.0 and mode == "fixed":
        dataset = subset_percent(dataset, percent)
    batch = plan.per_process
    sampler = ShardSampler(len(dataset), shuffle=cfg.TRAIN.SHUFFLE, seed=seed, pad=True, block=batch)
    full = len(sampler)
    rest = full % batch
    drop_last = rest > 0 and min(len(c) for c in torch.arange(rest).chunk(plan.accum_steps)) == 1
    full_steps = full // batch if drop_last else math.ceil(full / batch)
    if percent < 1.0 and mode != "fixed":
        steps = int(percent * full_steps)
        sampler.limit = steps * batch
        drop_last = False
    loader = _loader(dataset, cfg, device, batch, sampler, drop_last)
    if len(loader) == 0 and percent < 1.0 and mode != "fixed" and full_steps > 0:
        raise ValueError(
            f"training would run no step: PERCENT {percent} of the {full_steps} batches of an epoch is 0 batches "
            f"(TRAIN.PERCENT_MODE per_epoch, as the original); raise PERCENT to at least {1.0 / full_steps:.3g}")
    if len(loader) == 0:
        raise ValueError(
            f"training would run no step: {len(dataset)} training sample(s) (PERCENT {percent}) over "
            f"{plan.world_size} process(es) give each process {full} sample(s) for batches of {batch} ("
            f"{plan.describe()}), and a batch with a micro-batch of one sample is dropped (BatchNorm needs two). "
            f"Use more training data (PERCENT, DATASET.TRAIN_SET), fewer processes or a smaller "
            f"TRAIN.BATCH_SIZE_PER_GPU.")
    return TrainData(loader=loader, schedule_steps=full_steps if mode != "fixed" else len(loader))
