"""Segmentation: the task the trainer runs (Cityscapes), its evaluation, and the main functions of seg_train.py
and seg_test.py.

Training runs epochs TRAIN.BEGIN_EPOCH .. TRAIN.END_EPOCH on DATASET.TRAIN_SET ("main" phase), then
TRAIN.EXTRA_EPOCH more epochs on DATASET.EXTRA_TRAIN_SET ("extra" phase) with a fresh optimizer whose base rate
is TRAIN.EXTRA_LR and a schedule that restarts over the extra epochs. The global step (which decides unrolled or
equilibrium mode) runs on across both phases.

Files in OUTPUT_DIR/<dataset>/<config name>/: ``checkpoint.pth.tar`` (resumable training state; the one it
replaces stays as ``checkpoint_prev.pth.tar``), ``best.pth`` (bare state dict of the best validation mIoU),
``final_state.pth`` (bare state dict at the end), ``metrics.csv`` / ``results.json`` and, when training stops
after TRAIN.MAX_BAD_STEPS bad steps, ``last_good.pth.tar``.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader
from yacs.config import CfgNode as CN

from mdeq.core.data import BatchPlan, eval_loader, train_loader
from mdeq.core.metrics import confusion_matrix, iou_from_confusion, reduce_confusion
from mdeq.core.optim import original_epoch_iters
from mdeq.core.run import RunContext, model_to_evaluate, setup_run
from mdeq.core.seg_criterion import build_criterion
from mdeq.core.seg_inference import InferenceSettings, PredictionWriter, predict_labels, settings_from_cfg
from mdeq.core.events import Hook, Phase, Task, TrainState
from mdeq.core.trainer import extra_phase_cfg, progress
from mdeq.core.training import run_training
from mdeq.datasets import get_seg_dataset
from mdeq.models import get_seg_net
from mdeq.utils import distributed as du
from mdeq.utils.state_dict import load_pretrained, load_strict

logger = logging.getLogger(__name__)


def iou_table(iou: Sequence[float], class_names: Sequence[str]) -> str:
    """A text table of per-class IoU (percent), one class a line."""
    names = list(class_names) or [str(i) for i in range(len(iou))]
    names += [str(i) for i in range(len(names), len(iou))]
    width = max(len(n) for n in names[:len(iou)]) if len(iou) else 5
    lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 9)]
    lines += [f"{names[c]:<{width}}  {100.0 * float(v):6.2f}" for c, v in enumerate(iou)]
    return "\n".join(lines)


class _SolverRecorder(nn.Module):
    """Calls the network and keeps the forward solver's steps of every call (for the validation statistics)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.nsteps: List[torch.Tensor] = []

    def forward(self, image: torch.Tensor, train_step: int = -1) -> torch.Tensor:
        logits, info = self.net(image, train_step=train_step, return_info=True)
        if info.get("forward"):
            self.nsteps.append(info["forward"]["nstep"].detach().double())
        return logits


@torch.no_grad()
def validate(ctx: RunContext, loader: DataLoader, model: nn.Module, settings: InferenceSettings,
             num_classes: int, class_names: Sequence[str] = (),
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
        prediction_writer: writes prediction PNGs of this rank's images when given.

    Returns:
        ``{"IoU": (K,) per-class IoU array, "mIoU": mean over all K classes, "pixel_acc": float,
        "confusion": (K, K) int64 array, "count": images evaluated (all ranks), "forward_nstep": mean forward
        solver steps per call of the network, "time": seconds}``.
    """
    net = _SolverRecorder(du.unwrap_model(model)).eval()
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
    steps = torch.tensor([float(sum(net.nsteps)) if net.nsteps else 0.0, float(len(net.nsteps))],
                         dtype=torch.float64, device=ctx.device)
    du.all_reduce_sum(steps)
    conf_np = conf.cpu().numpy()
    iou, mean_iou, pixel_acc = iou_from_confusion(conf_np)
    result = {"IoU": iou, "mIoU": mean_iou, "pixel_acc": pixel_acc, "confusion": conf_np,
              "count": int(count.item()), "forward_nstep": float(steps[0]) / max(float(steps[1]), 1.0),
              "time": time.time() - start}
    labelled = int(conf_np.sum())
    if labelled == 0:
        logger.info("Test: Time %.3f\t(%d images without labelled pixels: nothing to score)", result["time"],
                    result["count"])
    else:
        logger.info("Per-class IoU:\n%s", iou_table(iou, class_names))
        logger.info("Test: Time %.3f\tmIoU %.4f\tPixel accuracy %.4f\t(%d images, %d labelled pixels, forward "
                    "nstep %.1f)", result["time"], mean_iou, pixel_acc, result["count"], labelled,
                    result["forward_nstep"])
    return result


def build_model(cfg: CN) -> Tuple[nn.Module, Optional[Dict[str, Any]]]:
    """The segmentation MDEQ, transfer-initialised from MODEL.PRETRAINED and/or loaded from TRAIN.MODEL_FILE.

    Returns:
        (model, what ``load_pretrained`` reported: loaded / dropped / misshapen / not_in_file keys, or None).
    """
    model = get_seg_net(cfg)
    report = None
    if cfg.MODEL.PRETRAINED:
        report = load_pretrained(model, cfg.MODEL.PRETRAINED)
        dropped = sorted({k.split(".")[0] for k in report["dropped"]})
        logger.info("=> MODEL.PRETRAINED %s: %d tensors loaded; modules dropped: %s", cfg.MODEL.PRETRAINED,
                    len(report["loaded"]), ", ".join(dropped) or "none")
    if cfg.TRAIN.MODEL_FILE:
        fmt = load_strict(model, cfg.TRAIN.MODEL_FILE)
        logger.info("=> initialised from TRAIN.MODEL_FILE %s (%s)", cfg.TRAIN.MODEL_FILE, fmt)
    return model, report


def load_test_model(cfg: CN, model_file: str) -> Tuple[nn.Module, str]:
    """The segmentation MDEQ of cfg with every weight from ``model_file`` (ours, a training checkpoint, or an
    original file with the ``model.`` prefix and ``loss.`` keys), in eval mode on the CPU.

    Returns:
        (model, description of the detected file format).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file does not fit the model (the message lists the keys).
    """
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"--testModel / TEST.MODEL_FILE {model_file} does not exist; check the path")
    model = get_seg_net(cfg)
    fmt = load_strict(model, model_file)
    return model.eval(), fmt


class SegmentationTask(Task):
    """Pixel-wise cross-entropy (or OHEM) against label maps; the best model by validation mIoU."""

    metric, metric_name, metric_format = "mIoU", "mIoU", "%.4f"
    best_file, final_file = "best.pth", "final_state.pth"
    sync_bn = True

    def __init__(self, ctx: RunContext, plan: BatchPlan) -> None:
        cfg = ctx.cfg
        self.ctx = ctx
        train_set = get_seg_dataset(cfg, "train")  # data problems are reported before the model is built
        self.valid_set = get_seg_dataset(cfg, "val")
        if not self.valid_set.has_labels:
            raise ValueError(f"DATASET.TEST_SET {cfg.DATASET.TEST_SET} has no labels; training validates on it, so "
                             f"point it at a labelled list such as list/cityscapes/val.lst")
        weights = getattr(train_set, "class_weights", None)
        weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.criterion = build_criterion(cfg, weights).to(ctx.device)
        # the original's poly schedule counted int(N / global batch) iterations an epoch, in both phases
        iters = original_epoch_iters(len(train_set), plan.global_batch)
        self._phases = [Phase("main", cfg.TRAIN.END_EPOCH, train_loader(train_set, cfg, ctx.device, plan, cfg.PERCENT),
                              cfg, epoch_iters=iters)]
        if cfg.TRAIN.EXTRA_EPOCH > 0:
            extra = train_loader(get_seg_dataset(cfg, "extra_train"), cfg, ctx.device, plan)
            self._phases.append(Phase("extra", cfg.TRAIN.END_EPOCH + cfg.TRAIN.EXTRA_EPOCH, extra,
                                      extra_phase_cfg(cfg),
                                      f"=> extra phase: {cfg.TRAIN.EXTRA_EPOCH} epochs on "
                                      f"{cfg.DATASET.EXTRA_TRAIN_SET}, lr {cfg.TRAIN.EXTRA_LR:g}", epoch_iters=iters))
        self.valid_loader = eval_loader(self.valid_set, cfg, ctx.device)
        self.settings = settings_from_cfg(cfg, training=True)

    def phases(self) -> List[Phase]:
        return self._phases

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.criterion(output, target)

    def validate(self, model: nn.Module, step: int) -> Dict[str, Any]:
        return validate(self.ctx, self.valid_loader, model, self.settings, self.valid_set.num_classes,
                        self.valid_set.class_names)

    def checkpoint_extra(self, state: TrainState) -> Dict[str, Any]:
        return {"best_mIoU": float(state.best), "phase": state.phase}


def run_train(args: argparse.Namespace, hooks: Sequence[Hook] = ()) -> Dict[str, Any]:
    """seg_train.py: trains, validates (mIoU) after every epoch, writes checkpoints.

    Returns:
        The last validation (``mIoU``, ``IoU``, ``pixel_acc``, ...) plus ``best_mIoU``, ``train_time`` and
        ``rank``.
    """
    return run_training(args, SegmentationTask, lambda ctx: build_model(ctx.cfg)[0], hooks)


def run_test(args: argparse.Namespace) -> Dict[str, Any]:
    """seg_test.py: evaluates TEST.MODEL_FILE on DATASET.TEST_SET with the TEST.* inference settings.

    A labelled list is scored (per-class IoU, mIoU, pixel accuracy); with TEST.SAVE_PREDICTIONS its colourised
    predictions, overlays and label-id maps are written. An image-only list (the test split) always gets its
    label-id maps written (the benchmark submission), plus colours and overlays with TEST.SAVE_PREDICTIONS.
    Files go to TEST.OUTPUT_DIR, or ``<log dir>/predictions``; each process writes the images it evaluated.

    Returns:
        The result of :func:`validate` plus ``has_labels``, ``output_dir`` (None when nothing was written),
        ``written`` (images written by this process) and ``rank``.
    """
    ctx = setup_run(args, "test")
    cfg = ctx.cfg
    model_file = model_to_evaluate(ctx, SegmentationTask.final_file)
    model, fmt = load_test_model(cfg, model_file)
    logger.info("=> evaluating %s (format: %s)", model_file, fmt)
    model = model.to(ctx.device)
    dataset = get_seg_dataset(cfg, "val")
    loader = eval_loader(dataset, cfg, ctx.device)
    settings = settings_from_cfg(cfg)
    logger.info("inference: scales %s, flip %s, sliding-window crop (h, w) %s%s", list(settings.scales),
                settings.flip, settings.crop_size,
                f", long side of scale 1: {settings.base_size}" if settings.base_size else "")
    out_dir = None
    writer = None
    if cfg.TEST.SAVE_PREDICTIONS or not dataset.has_labels:
        out_dir = cfg.TEST.OUTPUT_DIR or os.path.join(ctx.log_dir, "predictions")
        writer = PredictionWriter(dataset, out_dir, color=bool(cfg.TEST.SAVE_PREDICTIONS), label_ids=True)
    rank = ctx.rank
    try:
        result = validate(ctx, loader, model, settings, dataset.num_classes, dataset.class_names,
                          prediction_writer=writer)
    finally:
        du.cleanup()
    if writer is not None:
        logger.info("=> wrote predictions of %d image(s) to %s", writer.count, out_dir)
    if not dataset.has_labels:
        logger.info("DATASET.TEST_SET %s has no labels: no scores; the label-id maps in %s are the "
                    "benchmark submission", cfg.DATASET.TEST_SET, os.path.join(out_dir or "", "label_ids"))
    result.update(has_labels=dataset.has_labels, output_dir=out_dir, written=writer.count if writer else 0,
                  rank=rank)
    return result
