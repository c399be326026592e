"""The vocabulary of the training loop: the run's state, a task's phases, what the hooks are told, and the two
interfaces a new task or a new observer implements (:class:`Task`, :class:`Hook`).

:mod:`mdeq.core.trainer` runs them; a task lives in its own module (:mod:`mdeq.core.classification`,
:mod:`mdeq.core.segmentation`); the standard hooks are in :mod:`mdeq.core.hooks`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from yacs.config import CfgNode as CN

from mdeq.core.data import TrainData

if TYPE_CHECKING:  # annotations only
    from mdeq.core.trainer import Trainer


@dataclass
class TrainState:
    """Where a run stands; what a training checkpoint restores.

    Attributes:
        epoch: the epoch in progress (after an epoch: the next one).
        step: global optimizer steps taken (applied or skipped), across phases.
        batch: the batch of ``epoch`` in flight, or the first one to run after a mid-epoch resume.
        phase: the name of the phase of ``epoch``.
        best: the best validation metric so far.
        last: the last validation metric.
    """

    epoch: int = 0
    step: int = 0
    batch: int = 0
    phase: str = "main"
    best: float = 0.0
    last: float = 0.0


@dataclass
class Phase:
    """A stretch of epochs with its own data and optimizer.

    Attributes:
        name: ``main`` or ``extra``.
        end_epoch: the epoch at which the phase ends (exclusive).
        data: the phase's training loader.
        cfg: the config its optimizer and schedule are built from.
        start_message: logged when the run enters the phase from an earlier one.
        epoch_iters: for the ``poly`` schedule, the original's count of iterations per epoch (None: the steps
            of an epoch); see :func:`mdeq.core.optim.original_epoch_iters`.
    """

    name: str
    end_epoch: int
    data: TrainData
    cfg: CN
    start_message: str = ""
    epoch_iters: Optional[int] = None


class SolverMeter:
    """Sums of the solver statistics of the steps since :meth:`reset`, kept on the device (no host sync)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: Dict[str, torch.Tensor] = {}
        self.counts: Dict[str, int] = {}

    def add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.counts[key] = self.counts.get(key, 0) + 1

    def averages(self) -> Dict[str, float]:
        return {k: float(v) / self.counts[k] for k, v in self.sums.items()}


@dataclass
class StepRecord:
    """What one training step did, for the hooks.

    ``report`` is filled on the steps that are logged (every PRINT_FREQ batches and the last of an epoch): the
    meters of the epoch so far and the solver statistics averaged over the steps since the previous report.
    """

    epoch: int
    batch: int
    batches: int
    step: int
    n: int
    loss: float
    metrics: Dict[str, float]
    lr: float
    mode: str
    applied: bool
    batch_time: float
    data_time: float
    info: Dict[str, Any]
    report: Optional[Dict[str, Any]] = None


@dataclass
class EpochSummary:
    """One finished epoch, for the hooks (metrics.csv, TensorBoard, logs)."""

    epoch: int
    phase: str
    step: int
    seconds: float
    lr: float
    train: Dict[str, float]
    valid: Dict[str, Any]
    solver: Dict[str, float]
    mode: str
    f_calls_forward: int
    f_calls_backward: int
    best: float


class Hook:
    """Something that watches a run; override what you need. Hooks run on every rank, in the order given."""

    def on_run_start(self, trainer: "Trainer") -> None:
        pass

    def after_backward(self, trainer: "Trainer", epoch: int, batch: int, step: int) -> None:
        """After the backward pass of a step, before its optimizer update."""

    def on_step_end(self, trainer: "Trainer", record: StepRecord) -> None:
        pass

    def on_epoch_end(self, trainer: "Trainer", summary: EpochSummary) -> None:
        pass

    def on_run_end(self, trainer: "Trainer", result: Dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, trainer: "Trainer", path: str, epoch: int, batch: int) -> None:
        """A training checkpoint for (epoch, batch) was written to ``path`` (by rank 0; every rank is told)."""

    def on_stopped(self, trainer: "Trainer", checkpoint: str) -> None:
        """The run stopped on request after writing ``checkpoint``; the tool exits next."""

    def close(self, trainer: "Trainer") -> None:
        """Called last, however the run ended (also after an error)."""


class Task:
    """What a task supplies to the trainer; see :mod:`mdeq.core.classification` and
    :mod:`mdeq.core.segmentation`.

    Attributes:
        metric: the key of the validation result that decides the best model.
        metric_name: how logs name it.
        metric_format: how logs format it.
        best_file / final_file: names of the bare state dicts of the best and the final weights.
        sync_bn: whether BatchNorm statistics are synchronised across processes (where supported).
    """

    metric = "top1"
    metric_name = "Accuracy@1"
    metric_format = "%.3f"
    best_file = "model_best.pth.tar"
    final_file = "final_state.pth.tar"
    sync_bn = False

    def phases(self) -> List[Phase]:
        raise NotImplementedError

    def unpack(self, batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """(inputs (B, C, H, W), targets) of a loader batch, on the CPU."""
        return batch[0], batch[1]

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def batch_metrics(self, output: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
        """Training metrics of one batch, in percent (logged as running averages); none by default."""
        return {}

    def validate(self, model: nn.Module, step: int) -> Dict[str, Any]:
        raise NotImplementedError

    def checkpoint_extra(self, state: TrainState) -> Dict[str, Any]:
        """Task-specific entries of the training checkpoint."""
        return {}
