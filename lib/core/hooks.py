"""The trainer's standard hooks: the periodic log line, TensorBoard scalars and the run's metrics files.

Every tool's training run gets :func:`standard_hooks`; tests and benchmarks add their own :class:`Hook`.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
from typing import Any, Dict, List, Optional

from mdeq.core.run import RunContext
from mdeq.core.events import EpochSummary, Hook, StepRecord
from mdeq.core.trainer import Trainer, eta_text, solver_text
from mdeq.utils import distributed as du

logger = logging.getLogger(__name__)

METRICS_COLUMNS = ["epoch", "phase", "step", "seconds", "lr", "train_loss", "train_top1", "valid_loss",
                   "valid_top1", "valid_top5", "valid_mIoU", "valid_pixel_acc", "forward_nstep", "forward_abs_res",
                   "forward_rel_res", "backward_nstep", "backward_abs_res", "backward_rel_res",
                   "valid_forward_nstep", "f_calls_forward", "f_calls_backward"]


class LogHook(Hook):
    """The periodic training log line: time, speed, data time, loss and task metrics (value and epoch average),
    learning rate, ETA, mode, and the solver statistics averaged over the steps since the previous line."""

    def on_run_start(self, trainer: Trainer) -> None:
        logger.info("training: %s; %d phase(s) up to epoch %d", trainer.plan.describe(), len(trainer.phases),
                    trainer.last_epoch)

    def on_step_end(self, trainer: Trainer, record: StepRecord) -> None:
        report = record.report
        if report is None:
            return
        bt, dt = report["batch_time"], report["data_time"]
        parts = [f"Epoch: [{record.epoch}][{record.batch}/{record.batches}]",
                 f"Time {bt[0]:.3f}s ({bt[1]:.3f}s)",
                 f"Speed {record.n * du.get_world_size() / max(bt[0], 1e-9):.1f} samples/s",
                 f"Data {dt[0]:.3f}s ({dt[1]:.3f}s)"]
        names = {"loss": ("Loss", 5), "top1": ("Accuracy@1", 3), "top5": ("Accuracy@5", 3)}
        for key, (val, avg) in report["meters"].items():
            name, digits = names.get(key, (key, 4))
            parts.append(f"{name} {val:.{digits}f} ({avg:.{digits}f})")
        parts += [f"lr {record.lr:.3e}", eta_text(trainer, record, bt[1]), record.mode]
        logger.info("\t".join(parts) + solver_text(report["solver"]))


class TensorBoardHook(Hook):
    """Scalars for TensorBoard (rank 0): training loss, metrics and learning rate, and the solver statistics
    averaged over each print interval; every epoch's validation; the count of skipped steps."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self.skipped = 0

    def on_step_end(self, trainer: Trainer, record: StepRecord) -> None:
        step = record.step
        if trainer.guard.total != self.skipped:
            self.skipped = trainer.guard.total
            self.writer.add_scalar("train/skipped_steps", self.skipped, step)
        if record.report is None:
            return
        for key, (val, _) in record.report["meters"].items():
            self.writer.add_scalar(f"train/{key}", val, step)
        self.writer.add_scalar("train/lr", record.lr, step)
        for key, value in record.report["solver"].items():
            self.writer.add_scalar(key if "/" in key else f"train/{key}", value, step)

    def on_epoch_end(self, trainer: Trainer, summary: EpochSummary) -> None:
        for key, value in summary.valid.items():
            if isinstance(value, (int, float)) and key not in ("count", "time"):
                self.writer.add_scalar(f"valid/{key}", value, summary.step)
        self.writer.flush()

    def close(self, trainer: Trainer) -> None:
        self.writer.close()


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


class MetricsFilesHook(Hook):
    """Rank 0 writes ``metrics.csv`` (one row per epoch, appended and flushed after each validation) and, at the
    end, ``results.json`` and the plot ``metrics.png`` into the run's output folder. A resumed run appends to its
    own file."""

    def __init__(self, ctx: RunContext, config_path: str, overrides: List[str]) -> None:
        self.csv_path = os.path.join(ctx.output_dir, "metrics.csv")
        self.json_path = os.path.join(ctx.output_dir, "results.json")
        self.config_path, self.overrides = config_path, list(overrides)
        self.metric = "top1"
        self.rows = 0

    def on_run_start(self, trainer: Trainer) -> None:
        self.metric = trainer.task.metric
        if trainer.ctx.is_main and trainer.resumed_from is None and os.path.isfile(self.csv_path):
            os.remove(self.csv_path)  # a fresh run (the folder was checked to hold no other run's checkpoints)

    def on_epoch_end(self, trainer: Trainer, summary: EpochSummary) -> None:
        if not trainer.ctx.is_main:
            return
        valid = summary.valid
        row: Dict[str, Any] = {
            "epoch": summary.epoch, "phase": summary.mode, "step": summary.step, "seconds": summary.seconds,
            "lr": summary.lr, "train_loss": summary.train.get("loss"), "train_top1": summary.train.get("top1"),
            "valid_loss": valid.get("loss"), "valid_top1": valid.get("top1"), "valid_top5": valid.get("top5"),
            "valid_mIoU": valid.get("mIoU"), "valid_pixel_acc": valid.get("pixel_acc"),
            "valid_forward_nstep": valid.get("forward_nstep"),
            "f_calls_forward": summary.f_calls_forward, "f_calls_backward": summary.f_calls_backward}
        for phase in ("forward", "backward"):
            for key in ("nstep", "abs_res", "rel_res"):
                row[f"{phase}_{key}"] = summary.solver.get(f"{phase}/{key}")
        new = not os.path.isfile(self.csv_path)
        with open(self.csv_path, "a", newline="") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(METRICS_COLUMNS)
            writer.writerow([_cell(row.get(c)) for c in METRICS_COLUMNS])
            fh.flush()
        self.rows += 1

    def on_run_end(self, trainer: Trainer, result: Dict[str, Any]) -> None:
        if not trainer.ctx.is_main:
            return
        last = {k: float(v) for k, v in result.items()
                if isinstance(v, (int, float)) and k not in ("rank",)}
        out = {"metric": self.metric, "best": float(trainer.state.best), "last": last,
               "train_seconds": float(result.get("train_time", 0.0)), "epochs": int(trainer.state.epoch),
               "config": self.config_path, "overrides": self.overrides}
        tmp = self.json_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(out, fh, indent=2)
        os.replace(tmp, self.json_path)
        if self.rows or os.path.isfile(self.csv_path):
            self._plot(os.path.dirname(self.csv_path))

    @staticmethod
    def _plot(folder: str) -> None:
        """``metrics.png`` beside ``metrics.csv`` (needs matplotlib, the ``plot`` extra; skipped without it)."""
        try:
            from mdeq.utils.plotting import plot_runs

            path = plot_runs([folder], os.path.join(folder, "metrics.png"))
            logger.info("=> plotted the run into %s", path)
        except ImportError:
            logger.info("matplotlib is not installed: no metrics.png (pip install matplotlib, or the plot extra)")
        except (OSError, ValueError) as exc:  # a plot must never fail a finished run
            logger.warning("could not plot the run: %s", exc)


def tensorboard_writer(ctx: RunContext) -> Optional[Any]:
    """A TensorBoard writer on rank 0 (None elsewhere, or when TENSORBOARD is off or tensorboardX missing)."""
    if not ctx.is_main or not ctx.cfg.TENSORBOARD:
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # an optional extra: training goes on without scalars
        logger.warning("tensorboardX is not installed; no TensorBoard scalars are written (pip install tensorboardX)")
        return None
    return SummaryWriter(logdir=ctx.log_dir)


def standard_hooks(ctx: RunContext, config_path: str, overrides: List[str]) -> List[Hook]:
    """The hooks of every training tool: log lines, TensorBoard (rank 0), metrics files, stop on signals."""
    from mdeq.core.signals import StopOnSignal

    hooks: List[Hook] = [LogHook(), MetricsFilesHook(ctx, config_path, overrides)]
    writer = tensorboard_writer(ctx)
    if writer is not None:
        hooks.append(TensorBoardHook(writer))
    if ctx.cfg.TRAIN.STOP_SIGNALS:
        hooks.append(StopOnSignal(list(ctx.cfg.TRAIN.STOP_SIGNALS), requeue=ctx.cfg.TRAIN.REQUEUE))
    return hooks
