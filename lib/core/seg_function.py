"""One training epoch and one evaluation pass of a segmentation MDEQ."""
from __future__ import annotations

import logging
import random
import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from mdeq.core.cls_function import _solver_text, jacobian_weight, progress
from mdeq.core.engine import BadStepGuard, RunContext, guard_snapshot, guarded_update, unwrap
from mdeq.core.metrics import AverageMeter, confusion_matrix, iou_from_confusion, reduce_confusion, solver_summary
from mdeq.core.seg_inference import InferenceSettings, PredictionWriter, predict_labels
from mdeq.utils import distributed as du

logger = logging.getLogger(__name__)


def train_one_epoch(ctx: RunContext, loader: DataLoader, model: nn.Module, criterion: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int, state: Dict[str, Any],
                    guard: BadStepGuard, writer: Any = None,
                    on_step: Optional[Callable[[int], None]] = None) -> Dict[str, float]:
    """Trains for one epoch (or the rest of one, after a mid-epoch resume).

    Batches are ``(image (B, 3, H, W), label (B, H', W') int64, size, name)``. The global step ``state["step"]``
    decides the mode: weight-tied unrolling before TRAIN.PRETRAIN_STEPS, the equilibrium solve after. Steps with
    a non-finite loss or gradient (or, with TRAIN.SKIP_DIVERGED, a diverged solve) are skipped by ``guard``.

    Args:
        ctx: the run.
        loader: this rank's training loader.
        model: the (possibly DDP-wrapped) network, returning logits at 1/4 resolution.
        criterion: maps (logits, label) to a scalar loss.
        optimizer: the optimizer.
        scheduler: a per-step scheduler (stepped after every batch).
        epoch: the epoch number (for logs and the Jacobian-loss schedule).
        state: ``step`` (global step, updated here) and ``start_batch`` (first batch index of this epoch).
        guard: the bad-step guard.
        writer: TensorBoard writer or None.
        on_step: called with the batch index after every step (step-based checkpoints).

    Returns:
        This rank's average loss of the epoch, ``{"loss": float}``.

    Raises:
        TrainingDiverged: after TRAIN.MAX_BAD_STEPS consecutive skipped steps.
    """
    cfg = ctx.cfg
    model.train()
    batch_time, data_time, losses = AverageMeter(), AverageMeter(), AverageMeter()
    start = state.get("start_batch", 0)
    total = len(loader) + start
    end = time.time()
    for i, batch in enumerate(progress(loader, len(loader), f"epoch {epoch}", ctx.is_main), start):
        images, labels = batch[0], batch[1]
        data_time.update(time.time() - end)
        images = images.to(ctx.device, non_blocking=True)  # (B, 3, H, W)
        labels = labels.to(ctx.device, non_blocking=True)  # (B, H', W')
        step = state["step"]
        state["batch"] = i  # the batch in flight, for the checkpoint written when training diverges
        factor = jacobian_weight(cfg, step, epoch)
        compute_jac = factor > 0 and random.random() < cfg.LOSS.JAC_LOSS_FREQ
        guard_state = guard_snapshot(model)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16,
                            enabled=cfg.TRAIN.AMP and ctx.device.type == "cuda"):
            logits, info = model(images, train_step=step, compute_jac_loss=compute_jac, return_info=True)
            loss = criterion(logits.float(), labels)
        total_loss = loss + factor * info["jac_loss"] if info.get("jac_loss") is not None else loss
        optimizer.zero_grad(set_to_none=True)
        total_loss.backward()
        if cfg.TRAIN.CLIP > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.TRAIN.CLIP)
        guarded_update(ctx, model, optimizer, total_loss, info, guard, guard_state, epoch, step, writer)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        state["step"] = step + 1

        n = images.shape[0]
        losses.update(float(loss.detach()), n)
        batch_time.update(time.time() - end)
        end = time.time()
        if i % cfg.PRINT_FREQ == 0 or i == total - 1:
            stats = solver_summary(info)
            logger.info("Epoch: [%d][%d/%d]\tTime %.3fs (%.3fs)\tSpeed %.1f samples/s\tData %.3fs (%.3fs)\t"
                        "Loss %.5f (%.5f)\tlr %.3e\t%s%s",
                        epoch, i, total, batch_time.val, batch_time.avg,
                        n * du.get_world_size() / max(batch_time.val, 1e-9), data_time.val, data_time.avg,
                        losses.val, losses.avg, lr, info["mode"], _solver_text(stats))
            if writer is not None:
                writer.add_scalar("train/loss", losses.val, step)
                writer.add_scalar("train/lr", lr, step)
                for key, value in stats.items():
                    writer.add_scalar(key, value, step)
        if on_step is not None:
            on_step(i)
    state["start_batch"] = 0
    return {"loss": losses.avg}


def iou_table(iou: Sequence[float], class_names: Sequence[str]) -> str:
    """A text table of per-class IoU (percent), one class a line."""
    names = list(class_names) or [str(i) for i in range(len(iou))]
    names += [str(i) for i in range(len(names), len(iou))]
    width = max(len(n) for n in names[:len(iou)]) if len(iou) else 5
    lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 9)]
    lines += [f"{names[c]:<{width}}  {100.0 * float(v):6.2f}" for c, v in enumerate(iou)]
    return "\n".join(lines)


@torch.no_grad()
def validate(ctx: RunContext, loader: DataLoader, model: nn.Module, settings: InferenceSettings,
             num_classes: int, class_names: Sequence[str] = (), writer: Any = None, step: int = 0,
             prediction_writer: Optional[PredictionWriter] = None) -> Dict[str, Any]:
    """Full-image evaluation of this rank's shard; the confusion matrix is summed over all ranks.

    Inference runs on the bare network (not the DDP wrapper), so ranks with different numbers of images or
    windows never wait on each other.

    Args:
        ctx: the run.
        loader: this rank's evaluation loader (items ``(image, label, size, name)``, labels at image size).
        model: the network (DDP-wrapped or not).
        settings: scales, flip and sliding-window crop (see ``seg_inference``).
        num_classes: K.
        class_names: names for the IoU table.
        writer: TensorBoard writer or None.
        step: TensorBoard step.
        prediction_writer: writes prediction PNGs of this rank's images when given.

    Returns:
        ``{"IoU": (K,) per-class IoU array, "mIoU": mean over all K classes, "pixel_acc": float,
        "confusion": (K, K) int64 array, "count": images evaluated (all ranks), "time": seconds}``.
    """
    net = unwrap(model)
    net.eval()
    start = time.time()
    ignore = ctx.cfg.TRAIN.IGNORE_LABEL
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=ctx.device)
    count = torch.zeros(1, dtype=torch.int64, device=ctx.device)
    for batch in progress(loader, len(loader), "test", ctx.is_main):
        images, labels, names = batch[0], batch[1], batch[3]
        images = images.to(ctx.device, non_blocking=True)  # (B, 3, H, W)
        labels = labels.to(ctx.device, non_blocking=True)  # (B, H, W)
        preds = predict_labels(net, images, settings)  # (B, H, W)
        if preds.shape[-2:] != labels.shape[-2:]:
            raise ValueError(f"predictions are {tuple(preds.shape[-2:])} but labels {tuple(labels.shape[-2:])}; "
                             f"evaluation needs labels at image resolution")
        conf += confusion_matrix(preds, labels, num_classes, ignore)
        count += images.shape[0]
        if prediction_writer is not None:
            prediction_writer.write(images, preds, names)
    conf = reduce_confusion(conf)
    count = reduce_confusion(count)
    conf_np = conf.cpu().numpy()
    iou, mean_iou, pixel_acc = iou_from_confusion(conf_np)
    result = {"IoU": iou, "mIoU": mean_iou, "pixel_acc": pixel_acc, "confusion": conf_np,
              "count": int(count.item()), "time": time.time() - start}
    labelled = int(conf_np.sum())
    if labelled == 0:
        logger.info("Test: Time %.3f\t(%d images without labelled pixels: nothing to score)", result["time"],
                    result["count"])
    else:
        logger.info("Per-class IoU:\n%s", iou_table(iou, class_names))
        logger.info("Test: Time %.3f\tmIoU %.4f\tPixel accuracy %.4f\t(%d images, %d labelled pixels)",
                    result["time"], mean_iou, pixel_acc, result["count"], labelled)
    if writer is not None:
        writer.add_scalar("valid/mIoU", mean_iou, step)
        writer.add_scalar("valid/pixel_acc", pixel_acc, step)
    return result
