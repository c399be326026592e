"""One training epoch and one evaluation pass of a classification MDEQ."""
from __future__ import annotations

import logging
import random
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader
from yacs.config import CfgNode as CN

from mdeq.core.engine import BadStepGuard, RunContext, guard_restore, guard_snapshot, guarded_update  # noqa: F401
from mdeq.core.metrics import AverageMeter, correct_counts, solver_summary
from mdeq.utils import distributed as du

logger = logging.getLogger(__name__)


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


def progress(iterable, total: int, desc: str, enabled: bool):
    """A tqdm progress bar when the output is a terminal (rank 0 only); the iterable itself otherwise."""
    if not enabled or not sys.stdout.isatty():
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _solver_text(stats: Dict[str, float]) -> str:
    parts = []
    for phase, short in (("forward", "Fwd"), ("backward", "Bwd")):
        if f"{phase}/nstep" in stats:
            parts.append(f"{short} nstep {stats[phase + '/nstep']:.1f} res {stats[phase + '/abs_res']:.2e} "
                         f"rel {stats[phase + '/rel_res']:.2e}")
    if "jac_loss" in stats:
        parts.append(f"Jac {stats['jac_loss']:.4f}")
    return ("\t" + "\t".join(parts)) if parts else ""


def train_one_epoch(ctx: RunContext, loader: DataLoader, model: nn.Module, criterion: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int, state: Dict[str, Any],
                    guard: BadStepGuard, writer: Any = None,
                    on_step: Optional[Callable[[int], None]] = None) -> Dict[str, float]:
    """Trains for one epoch (or the rest of one, after a mid-epoch resume).

    ``state`` holds the global step ``step`` (updated here) and ``start_batch`` (the first batch index of this
    epoch, non-zero after a mid-epoch resume). ``on_step(batch_index)`` runs after every applied step (used for
    step-based checkpoints). Returns the epoch's average loss and top-1 accuracy (this rank's).
    """
    cfg = ctx.cfg
    model.train()
    batch_time, data_time, losses, top1, top5 = (AverageMeter() for _ in range(5))
    start = state.get("start_batch", 0)
    total = len(loader) + start
    end = time.time()
    for i, (images, target) in enumerate(progress(loader, len(loader), f"epoch {epoch}", ctx.is_main), start):
        data_time.update(time.time() - end)
        images = images.to(ctx.device, non_blocking=True)
        target = target.to(ctx.device, non_blocking=True)
        step = state["step"]
        state["batch"] = i  # the batch in flight, for the checkpoint written when training diverges
        factor = jacobian_weight(cfg, step, epoch)
        compute_jac = factor > 0 and random.random() < cfg.LOSS.JAC_LOSS_FREQ
        guard_state = guard_snapshot(model)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=cfg.TRAIN.AMP and ctx.device.type == "cuda"):
            output, info = model(images, train_step=step, compute_jac_loss=compute_jac, return_info=True)
            loss = criterion(output.float(), target)
        total_loss = loss + factor * info["jac_loss"] if info.get("jac_loss") is not None else loss
        optimizer.zero_grad(set_to_none=True)
        total_loss.backward()
        if cfg.TRAIN.CLIP > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.TRAIN.CLIP)
        guarded_update(ctx, model, optimizer, total_loss, info, guard, guard_state, epoch, step, writer)
        scheduler.step()
        state["step"] = step + 1

        n = images.shape[0]
        losses.update(float(loss.detach()), n)
        c1, c5 = correct_counts(output.detach(), target, (1, 5)).tolist()
        top1.update(100.0 * c1 / n, n)
        top5.update(100.0 * c5 / n, n)
        batch_time.update(time.time() - end)
        end = time.time()
        if i % cfg.PRINT_FREQ == 0 or i == total - 1:
            stats = solver_summary(info)
            logger.info(
                "Epoch: [%d][%d/%d]\tTime %.3fs (%.3fs)\tSpeed %.1f samples/s\tData %.3fs (%.3fs)\t"
                "Loss %.5f (%.5f)\tAccuracy@1 %.3f (%.3f)\tAccuracy@5 %.3f (%.3f)\t%s%s",
                epoch, i, total, batch_time.val, batch_time.avg, n * du.get_world_size() / max(batch_time.val, 1e-9),
                data_time.val, data_time.avg, losses.val, losses.avg, top1.val, top1.avg, top5.val, top5.avg,
                info["mode"], _solver_text(stats))
            if writer is not None:
                writer.add_scalar("train/loss", losses.val, step)
                writer.add_scalar("train/top1", top1.val, step)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
                for key, value in stats.items():
                    writer.add_scalar(key, value, step)
        if on_step is not None:
            on_step(i)
    state["start_batch"] = 0
    return {"loss": losses.avg, "top1": top1.avg}


@torch.no_grad()
def validate(ctx: RunContext, loader: DataLoader, model: nn.Module, criterion: nn.Module,
             writer: Any = None, step: int = 0) -> Dict[str, float]:
    """Evaluates on this rank's shard and reduces over all ranks: the result covers the whole test set."""
    model.eval()
    start = time.time()
    sums = torch.zeros(6, dtype=torch.float64, device=ctx.device)  # loss, top1, top5, n, f-steps, batches
    for images, target in progress(loader, len(loader), "test", ctx.is_main):
        images = images.to(ctx.device, non_blocking=True)
        target = target.to(ctx.device, non_blocking=True)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16,
                            enabled=ctx.cfg.TRAIN.AMP and ctx.device.type == "cuda"):
            output, info = model(images, train_step=-1, return_info=True)
        output = output.float()
        n = images.shape[0]
        sums[0] += criterion(output, target).double() * n
        sums[1:3] += correct_counts(output, target, (1, 5)).double()
        sums[3] += n
        if info.get("forward"):
            sums[4] += info["forward"]["nstep"].double()
            sums[5] += 1
    du.all_reduce_sum(sums)
    n = max(float(sums[3]), 1.0)
    result = {"loss": float(sums[0]) / n, "top1": 100.0 * float(sums[1]) / n, "top5": 100.0 * float(sums[2]) / n,
              "count": int(sums[3]), "forward_nstep": float(sums[4]) / max(float(sums[5]), 1.0),
              "time": time.time() - start}
    logger.info("Test: Time %.3f\tLoss %.4f\tError@1 %.3f\tError@5 %.3f\tAccuracy@1 %.3f\tAccuracy@5 %.3f\t"
                "(%d images, forward nstep %.1f)", result["time"], result["loss"], 100 - result["top1"],
                100 - result["top5"], result["top1"], result["top5"], result["count"], result["forward_nstep"])
    if writer is not None:
        writer.add_scalar("valid/loss", result["loss"], step)
        writer.add_scalar("valid/top1", result["top1"], step)
        writer.add_scalar("valid/forward_nstep", result["forward_nstep"], step)
    return result
