"""The one training loop of every task: the step, the epoch and the run, with hooks.

A run goes through phases (classification: one; segmentation: the main phase and an optional extra phase with
its own data and optimizer). The global step runs on across phases and decides the mode of the model:
weight-tied unrolling before TRAIN.PRETRAIN_STEPS, the equilibrium solve after. One step:

    batch -> task.unpack -> [micro-batches: model(x, train_step, compute_jac_loss) -> task.loss (+ Jacobian loss)
    -> backward] -> clip -> guarded optimizer step -> scheduler step -> hooks

After every epoch the task validates; the trainer writes the resumable checkpoint and the best weights. A task
(:class:`Task`) supplies only what differs: its phases, how a batch is unpacked, the loss, batch metrics,
validation and file names. Hooks (:class:`Hook`) see the run, every step and every epoch: logging, TensorBoard,
periodic checkpoints, metrics files, signal handling, and tests' fault injection are hooks.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import torch
from torch import nn
from yacs.config import CfgNode as CN

from mdeq.core.checkpointing import (LAST_GOOD, LATEST, clear_partial_files, load_training_checkpoint,
                                     refuse_overwrite, restore_rng_state, resume_error, resume_path,
                                     warn_if_resharded, write_training_checkpoint, write_weights)
from mdeq.core.data import BatchPlan, micro_batches
from mdeq.core.events import EpochSummary, Hook, Phase, SolverMeter, StepRecord, Task, TrainState
from mdeq.core.guard import BadStepGuard, TrainingDiverged
from mdeq.core.optim import build_optimizer, build_scheduler
from mdeq.core.run import RunContext
from mdeq.utils import distributed as du
from mdeq.utils.checkpoint import CheckpointError
from mdeq.utils.errors import UserError

logger = logging.getLogger(__name__)

SOLVER_KEYS = ("nstep", "abs_res", "rel_res")
_WORKERS_GONE = object()  # what :meth:`Trainer._batches` yields when the loader's workers died after a stop request


class TrainingStopped(UserError):
    """Training stopped on a signal after writing a resumable checkpoint (exit status 3)."""

    exit_code = 3
    prefix = "stopped"


def jacobian_weight(cfg: CN, step: int, epoch: int) -> float:
    """The Jacobian-loss weight at a global step (0 disables it).

    Unrolled pretraining uses PRETRAIN_JAC_LOSS_WEIGHT; equilibrium training JAC_LOSS_WEIGHT, grown by 0.1 every
    JAC_INCREMENTAL steps; nothing from JAC_STOP_EPOCH on.
    """
    loss = cfg.LOSS
    deq_steps = step - cfg.TRAIN.PRETRAIN_STEPS
    if epoch >= loss.JAC_STOP_EPOCH:
        return 0.0
    if deq_steps < 0:
        return loss.PRETRAIN_JAC_LOSS_WEIGHT
    if loss.JAC_INCREMENTAL > 0:
        return loss.JAC_LOSS_WEIGHT + 0.1 * (deq_steps // loss.JAC_INCREMENTAL)
    return loss.JAC_LOSS_WEIGHT


def progress(iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    """A tqdm progress bar on stdout when it is a terminal (rank 0 only); the iterable itself otherwise.

    Log lines go through :class:`mdeq.utils.logging_utils.ConsoleHandler`, which clears and redraws the bar, so
    the two never share a line.
    """
    if not enabled or not sys.stdout.isatty():
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stdout)


def solver_text(stats: Dict[str, float]) -> str:
    """The solver part of a log line: forward/backward nstep and residuals, the Jacobian loss."""
    parts = []
    for phase, short in (("forward", "Fwd"), ("backward", "Bwd")):
        if f"{phase}/nstep" in stats:
            parts.append(f"{short} nstep {stats[phase + '/nstep']:.1f} res {stats[phase + '/abs_res']:.2e} "
                         f"rel {stats[phase + '/rel_res']:.2e}")
    if "jac_loss" in stats:
        parts.append(f"Jac {stats['jac_loss']:.4f}")
    return ("\t" + "\t".join(parts)) if parts else ""


class _Meter:
    def __init__(self) -> None:
        self.val = self.sum = 0.0
        self.count = 0

    def update(self, val: float, n: int = 1) -> None:
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n

    @property
    def avg(self) -> float:
        return self.sum / max(self.count, 1)


def _phase_cfg(cfg: CN, lr: float, end_epoch: int) -> CN:
    out = cfg.clone()
    out.defrost()
    out.TRAIN.LR = lr
    out.TRAIN.END_EPOCH = end_epoch
    out.freeze()
    return out


def extra_phase_cfg(cfg: CN) -> CN:
    """The config the extra phase's optimizer and schedule are built from (EXTRA_LR over EXTRA_EPOCH)."""
    return _phase_cfg(cfg, cfg.TRAIN.EXTRA_LR, cfg.TRAIN.EXTRA_EPOCH)


# ---------------------------------------------------------------------------------------------- trainer
CHOOSE_RESUME = object()  # Trainer(resume_from=...): choose the checkpoint (checkpointing.resume_path) at run time


class Trainer:
    """Runs the phases of a task from TRAIN.BEGIN_EPOCH (or a checkpoint) to the end, with hooks.

    Args:
        ctx: the run.
        task: what differs between tasks.
        model: the network, already on the device and wrapped for several processes.
        plan: how a step's batch is split.
        hooks: the hooks, called in order.
        resume_from: the checkpoint to resume from, None to start afresh, or (default) CHOOSE_RESUME to choose
            it from the config when the run starts.
    """

    def __init__(self, ctx: RunContext, task: Task, model: nn.Module, plan: BatchPlan,
                 hooks: Sequence[Hook] = (), resume_from: Any = CHOOSE_RESUME) -> None:
        self.ctx, self.cfg, self.task, self.model, self.plan = ctx, ctx.cfg, task, model, plan
        self.resume_from = resume_from  # a checkpoint path, None (start afresh) or CHOOSE_RESUME (at run time)
        self.hooks = list(hooks)
        if self.cfg.TRAIN.PRETRAIN_COUNT not in ("scheduler", "steps"):
            raise ValueError(f"TRAIN.PRETRAIN_COUNT: unknown value {self.cfg.TRAIN.PRETRAIN_COUNT!r}; use scheduler "
                             f"(the original's count) or steps")
        self.phases = task.phases()
        self.last_epoch = self.phases[-1].end_epoch
        self.guard = BadStepGuard(self.cfg.TRAIN.MAX_BAD_STEPS, self.cfg.TRAIN.SKIP_DIVERGED)
        self.state = TrainState(epoch=self.cfg.TRAIN.BEGIN_EPOCH, phase=self._phase_of(self.cfg.TRAIN.BEGIN_EPOCH).name)
        self.state.step = self.state.epoch * len(self.phases[0].data.loader)
        self.optimizer, self.scheduler = self._build_optimizer(self._phase_of(self.state.epoch))
        self.stop_reason: Optional[str] = None
        self.start_time = time.time()
        self.f_calls = [0, 0]  # batched calls of f: forward, backward (this process, since the start)
        self.epoch_solver = SolverMeter()
        self.interval_solver = SolverMeter()
        self.resumed_from: Optional[str] = None

    # ------------------------------------------------------------------------------------------- helpers
    @property
    def net(self) -> nn.Module:
        return du.unwrap_model(self.model)

    def path(self, name: str) -> str:
        return os.path.join(self.ctx.output_dir, name)

    def _phase_of(self, epoch: int) -> Phase:
        for phase in self.phases:
            if epoch < phase.end_epoch:
                return phase
        return self.phases[-1]

    def _phase_named(self, name: str) -> Phase:
        for phase in self.phases:
            if phase.name == name:
                return phase
        raise ValueError(f"the checkpoint is in training phase {name!r}, which this config does not have")

    def _build_optimizer(self, phase: Phase):
        optimizer = build_optimizer(phase.cfg, self.model)
        return optimizer, build_scheduler(phase.cfg, optimizer, phase.data.schedule_steps, phase.epoch_iters)

    def model_step(self, step: int, epoch: int) -> int:
        """The step count that decides unrolled or equilibrium mode (compared with TRAIN.PRETRAIN_STEPS).

        The original passed its scheduler's step count: optimizer steps for per-step schedules (cosine), but
        ``epoch + 1`` for the per-epoch step / multistep schedules, so that PRETRAIN_STEPS then counted epochs.
        TRAIN.PRETRAIN_COUNT ``scheduler`` (default) does the same; ``steps`` always counts optimizer steps.
        """
        if self.cfg.TRAIN.PRETRAIN_COUNT == "scheduler" and self.cfg.TRAIN.LR_SCHEDULER.lower() in ("step",
                                                                                                     "multistep"):
            return epoch + 1
        return step

    def request_stop(self, reason: str) -> None:
        """Asks the run to stop at the next step boundary (after writing a resumable checkpoint)."""
        self.stop_reason = reason

    def checkpoint_contents(self, epoch: int, batch: int, perf: float) -> Dict[str, Any]:
        """The training checkpoint of the current state (see :mod:`mdeq.core.checkpointing`)."""
        state = self.state
        contents = {"epoch": epoch, "step": state.step, "batch": batch, "world_size": self.ctx.world_size,
                    "model": self.cfg.MODEL.NAME, "state_dict": self.net.state_dict(), "perf": float(perf),
                    "best_perf": float(state.best), "optimizer": self.optimizer.state_dict(),
                    "lr_scheduler": self.scheduler.state_dict(), "config": self.cfg.dump(),
                    "channels_last": bool(getattr(self.net, "channels_last", False))}
        contents.update(self.task.checkpoint_extra(state))
        return contents

    def save_checkpoint(self, epoch: int, batch: int, perf: float, collective: bool = True,
                        name: str = LATEST) -> str:
        """Writes the resumable training checkpoint (every rank calls this when ``collective``)."""
        path = self.path(name)
        write_training_checkpoint(path, self.checkpoint_contents(epoch, batch, perf), collective)
        for hook in self.hooks:
            hook.on_checkpoint(self, path, epoch, batch)
        return path

    # -------------------------------------------------------------------------------------------- resume
    def resume(self) -> None:
        """Continues from ``resume_from``, or the checkpoint that TRAIN.CHECKPOINT / AUTO_RESUME / TRAIN.RESUME
        name, if any."""
        path = self.resume_from
        if path is CHOOSE_RESUME:
            path = resume_path(self.cfg, self.ctx.output_dir)
        if not path:
            return
        try:
            ckpt = load_training_checkpoint(path)
            epoch = int(ckpt["epoch"])
            phase = self._phase_named(str(ckpt.get("phase", self._phase_of(epoch).name)))
            self.net.load_state_dict(ckpt["state_dict"])
            self.optimizer, self.scheduler = self._build_optimizer(phase)
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["lr_scheduler"])
        except (CheckpointError, KeyError, ValueError, RuntimeError) as exc:
            raise resume_error(path, exc) from None
        best = ckpt.get("best_perf", ckpt.get("best_mIoU", ckpt.get("perf", 0.0)))
        self.state = TrainState(epoch=epoch, step=int(ckpt.get("step", epoch * len(self.phases[0].data.loader))),
                                batch=int(ckpt.get("batch", 0)), phase=phase.name, best=float(best),
                                last=float(ckpt.get("perf", 0.0)))
        restore_rng_state(ckpt)
        warn_if_resharded(ckpt, path)
        self.resumed_from = path
        logger.info("=> resumed from %s: epoch %d, step %d, batch %d (%s phase), best %s " + self.task.metric_format,
                    path, epoch, self.state.step, self.state.batch, phase.name, self.task.metric_name,
                    self.state.best)

    # ---------------------------------------------------------------------------------------------- step
    def _step(self, batch: Any, epoch: int, i: int, batches: int, data_time: float, started: float) -> StepRecord:
        cfg, ctx, model, plan = self.cfg, self.ctx, self.model, self.plan
        inputs, target = self.task.unpack(batch)
        inputs = inputs.to(ctx.device, non_blocking=True)
        target = target.to(ctx.device, non_blocking=True)
        step = self.state.step
        self.state.batch = i  # the batch in flight, for the checkpoint written when training diverges
        model_step = self.model_step(step, epoch)
        factor = jacobian_weight(cfg, model_step, epoch)  # the loss of the mode the model is in
        compute_jac = factor > 0 and random.random() < cfg.LOSS.JAC_LOSS_FREQ
        if factor > 0:  # one decision per step for all processes, as the original's single process made it
            compute_jac = du.same_on_all_ranks(compute_jac, ctx.device)
        self.guard.snapshot(model)
        self.optimizer.zero_grad(set_to_none=True)
        pieces = list(zip(micro_batches(inputs, plan.accum_steps), micro_batches(target, plan.accum_steps)))
        n = inputs.shape[0]
        amp = cfg.TRAIN.AMP and ctx.device.type == "cuda"
        loss_sum: Optional[torch.Tensor] = None
        total_sum: Optional[torch.Tensor] = None
        metrics: Dict[str, float] = {}
        infos: List[Dict[str, Any]] = []
        kept: List[torch.Tensor] = []
        for k, (x, y) in enumerate(pieces):
            last = k == len(pieces) - 1
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
                    output, info = model(x, train_step=model_step, compute_jac_loss=compute_jac, return_info=True)
                    loss = self.task.loss(output.float(), y)
                total = loss + factor * info["jac_loss"] if info.get("jac_loss") is not None else loss
                if len(pieces) > 1:
                    weight = x.shape[0] / n
                    (total * weight).backward()
                    loss, total = loss.detach() * weight, total.detach() * weight
                    kept = self._first_micro_batch_buffers(model, k, kept)  # after backward: autograd saved them
                else:
                    total.backward()
            loss_sum = loss if loss_sum is None else loss_sum + loss
            total_sum = total if total_sum is None else total_sum + total
            for key, value in self.task.batch_metrics(output.detach(), y).items():
                metrics[key] = metrics.get(key, 0.0) + value * x.shape[0] / n
            infos.append(info)
        if cfg.TRAIN.CLIP > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.TRAIN.CLIP)
        for hook in self.hooks:
            hook.after_backward(self, epoch, i, step)
        diverged = any(info.get("forward") is not None and bool(info["forward"]["diverged"] > 0) for info in infos) \
            if cfg.TRAIN.SKIP_DIVERGED else False
        applied = self.guard.apply(model, self.optimizer, total_sum, diverged, epoch, step)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.state.step = step + 1
        self._count_solver(infos)
        return StepRecord(epoch=epoch, batch=i, batches=batches, step=step, n=n, loss=float(loss_sum.detach()),
                          metrics=metrics, lr=lr, mode=infos[-1]["mode"], applied=applied,
                          batch_time=time.time() - started, data_time=data_time, info=infos[-1])

    @staticmethod
    def _first_micro_batch_buffers(model: nn.Module, k: int, kept: List[torch.Tensor]) -> List[torch.Tensor]:
        """Keeps the buffers (BatchNorm running statistics) as the first micro-batch of a step left them.

        DataParallel kept only the first GPU's update of the running statistics, and DDP keeps rank 0's, which
        trains on the first micro-batch of each global batch; so the later micro-batches of a step do not update
        them either, and one process with micro-batches ends with the statistics of several processes.
        """
        if k == 0:
            return [b.detach().clone() for b in model.buffers()]
        with torch.no_grad():
            for buffer, first in zip(model.buffers(), kept):
                buffer.copy_(first)
        return kept

    def _count_solver(self, infos: List[Dict[str, Any]]) -> None:
        """Adds the steps' solver statistics to the epoch and interval meters and counts the calls of f."""
        for info in infos:
            if info["mode"] != "equilibrium":
                self.f_calls[0] += self.cfg.MODEL.NUM_LAYERS
                self.f_calls[1] += self.cfg.MODEL.NUM_LAYERS
            for phase, slot in (("forward", 0), ("backward", 1)):
                stats = info.get(phase)
                if not stats:
                    continue
                if "nfev" in stats:
                    self.f_calls[slot] += int(stats["nfev"])
                for key in SOLVER_KEYS:
                    for meter in (self.epoch_solver, self.interval_solver):
                        meter.add(f"{phase}/{key}", stats[key])
            if info.get("jac_loss") is not None:
                for meter in (self.epoch_solver, self.interval_solver):
                    meter.add("jac_loss", info["jac_loss"])

    # --------------------------------------------------------------------------------------------- epoch
    def train_epoch(self, phase: Phase, epoch: int) -> Dict[str, float]:
        """Trains one epoch (or the rest of one, after a mid-epoch resume); returns this rank's averages."""
        cfg = self.cfg
        self.model.train()
        loader = phase.data.loader
        start = self.state.batch
        batches = len(loader) + start
        meters: Dict[str, _Meter] = {"loss": _Meter()}
        batch_time, data_time = _Meter(), _Meter()
        self.epoch_solver.reset()
        self.interval_solver.reset()
        modes = set()
        every = cfg.TRAIN.CHECKPOINT_EVERY_STEPS
        end = time.time()
        for i, batch in enumerate(self._batches(progress(loader, len(loader), f"epoch {epoch}", self.ctx.is_main)),
                                  start):
            if batch is _WORKERS_GONE:  # the signal that stops the run ended the loader's workers too
                self.save_checkpoint(epoch, i, self.state.best)
                raise self._stopped(epoch, i)
            waited = time.time() - end
            record = self._step(batch, epoch, i, batches, waited, end)
            modes.add(record.mode)
            batch_time.update(record.batch_time)
            data_time.update(record.data_time)
            meters["loss"].update(record.loss, record.n)
            for key, value in record.metrics.items():
                meters.setdefault(key, _Meter()).update(value, record.n)
            if i % cfg.PRINT_FREQ == 0 or i == batches - 1:
                record.report = {"meters": {k: (m.val, m.avg) for k, m in meters.items()},
                                 "batch_time": (batch_time.val, batch_time.avg),
                                 "data_time": (data_time.val, data_time.avg),
                                 "solver": self.interval_solver.averages(),
                                 "skipped": self.guard.total}
                self.interval_solver.reset()
            for hook in self.hooks:
                hook.on_step_end(self, record)
            if self._stop_now():  # (this checkpoint also serves as the periodic one of this step)
                self.save_checkpoint(epoch, i + 1, self.state.best)
                raise self._stopped(epoch, i + 1)
            if every > 0 and self.state.step % every == 0 and i + 1 < batches:
                self.save_checkpoint(epoch, i + 1, self.state.best)
            end = time.time()
        self.state.batch = 0
        out = {key: m.avg for key, m in meters.items()}
        out["mode"] = modes.pop() if len(modes) == 1 else ("mixed" if modes else "")
        return out

    def _batches(self, iterable: Iterable) -> Iterator[Any]:
        """The loader's batches; after a stop request, a loader whose workers died ends with a marker instead
        of an error (the batch was not trained, so the run stops cleanly before it)."""
        it = iter(iterable)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except RuntimeError:
                if self.stop_reason is None:
                    raise
                yield _WORKERS_GONE
                return
            yield batch

    def _stop_now(self) -> bool:
        """Whether any rank was asked to stop (a collective when several processes run and a hook may ask)."""
        return du.any_rank(self.stop_reason is not None, self.ctx.device) if du.is_distributed() \
            else self.stop_reason is not None

    def _stopped(self, epoch: int, batch: int) -> TrainingStopped:
        path = self.path(LATEST)
        return TrainingStopped(
            f"{self.stop_reason or 'a stop request on another process'} at epoch {epoch}, batch {batch} (step "
            f"{self.state.step}); the training state is in {path}. Run the same command with AUTO_RESUME True (or "
            f"TRAIN.RESUME True) to continue from there.")

    # ----------------------------------------------------------------------------------------------- run
    def run(self) -> Dict[str, Any]:
        """Trains to the end; returns the last validation plus ``best``, ``train_time`` and ``rank``.

        Raises:
            TrainingStopped: a stop was requested (a signal); the checkpoint to resume from has been written.
            TrainingDiverged: too many bad steps in a row; the last good state has been written.
        """
        try:
            return self._run()
        except TrainingStopped:
            for hook in self.hooks:
                hook.on_stopped(self, self.path(LATEST))
            raise
        finally:
            for hook in self.hooks:
                hook.close(self)

    def _run(self) -> Dict[str, Any]:
        cfg, ctx, task = self.cfg, self.ctx, self.task
        clear_partial_files(ctx.output_dir, [task.best_file, task.final_file])
        self.resume()
        if self.resumed_from is None:
            refuse_overwrite(ctx.output_dir, [task.best_file, task.final_file], cfg.TRAIN.OVERWRITE)
        for hook in self.hooks:
            hook.on_run_start(self)
        result: Dict[str, Any] = {}
        current = self.state.phase
        for epoch in range(self.state.epoch, self.last_epoch):
            phase = self._phase_of(epoch)
            if phase.name != current:
                current = phase.name
                self.optimizer, self.scheduler = self._build_optimizer(phase)
                if phase.start_message:
                    logger.info(phase.start_message)
            self.state.epoch, self.state.phase = epoch, phase.name
            if self._stop_now():  # asked before this epoch's first step (e.g. while the data were loading)
                self.save_checkpoint(epoch, self.state.batch, self.state.best)
                raise self._stopped(epoch, self.state.batch)
            sampler = phase.data.sampler
            sampler.set_epoch(epoch)
            sampler.set_start(self.state.batch * self.plan.per_process)
            try:
                train = self.train_epoch(phase, epoch)
            except TrainingDiverged as exc:  # resumable at the batch that failed, with the weights before it
                self.save_checkpoint(epoch, self.state.batch, 0.0, name=LAST_GOOD)
                path = self.path(LAST_GOOD)
                raise TrainingDiverged(f"{exc} The last good state (weights, optimizer, schedule) is in {path}; to "
                                       f"go on from it, change the settings and pass TRAIN.CHECKPOINT {path}.") from None
            sampler.set_start(0)
            result = task.validate(self.model, self.state.step)
            self._end_epoch(epoch, phase, train, result)
            if epoch + 1 < self.last_epoch and self._stop_now():  # the epoch's checkpoint is written
                raise self._stopped(epoch + 1, 0)
        if not result:  # nothing left to train (a finished run resumed): still report the model's quality
            result = task.validate(self.model, self.state.step)
        train_time = time.time() - self.start_time
        final = self.path(task.final_file)
        write_weights(self.net.state_dict(), final)
        if ctx.is_main:
            logger.info("=> training took %.1f s; final state in %s", train_time, final)
        result = dict(result, train_time=train_time, best=self.state.best, rank=ctx.rank)
        for hook in self.hooks:
            hook.on_run_end(self, result)
        return result

    def _end_epoch(self, epoch: int, phase: Phase, train: Dict[str, float], result: Dict[str, Any]) -> None:
        """Writes the epoch's checkpoint and the best weights, logs, and tells the hooks."""
        task, state = self.task, self.state
        metric = float(result[task.metric])
        best_file = self.path(task.best_file)
        is_best = metric > state.best or not os.path.isfile(best_file)  # the first epoch is the best so far
        state.best, state.last = max(state.best, metric), metric
        state.epoch, state.batch = epoch + 1, 0
        self.save_checkpoint(epoch + 1, 0, metric)
        if is_best:
            write_weights(self.net.state_dict(), best_file)
        seconds = time.time() - self.start_time
        if self.ctx.is_main:
            logger.info("=> saved checkpoint (epoch %d, %s " + task.metric_format + ", best " + task.metric_format +
                        ", %.1f s of training) to %s", epoch + 1, task.metric_name, metric, state.best, seconds,
                        self.ctx.output_dir)
        du.barrier()
        summary = EpochSummary(epoch=epoch + 1, phase=phase.name, step=state.step, seconds=seconds,
                               lr=self.optimizer.param_groups[0]["lr"],
                               train={k: v for k, v in train.items() if k != "mode"}, valid=result,
                               solver=self.epoch_solver.averages(), mode=str(train.get("mode", "")),
                               f_calls_forward=self.f_calls[0], f_calls_backward=self.f_calls[1], best=state.best)
        for hook in self.hooks:
            hook.on_epoch_end(self, summary)


def eta_text(trainer: Trainer, record: StepRecord, seconds_per_step: float) -> str:
    """Time left in this epoch and in the run, from the average step time (validation not counted)."""
    left_epoch = max(0, record.batches - record.batch - 1)
    left_run = left_epoch
    for epoch in range(record.epoch + 1, trainer.last_epoch):
        phase = trainer._phase_of(epoch)
        left_run += record.batches if phase.name == trainer.state.phase else len(phase.data.loader)

    def fmt(s: float) -> str:
        s = int(round(s))
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"

    return f"ETA {fmt(left_epoch * seconds_per_step)} (epoch), {fmt(left_run * seconds_per_step)} (run)"
