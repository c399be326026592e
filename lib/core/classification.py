"""Classification: the task the trainer runs (ImageNet, CIFAR-10, Fashion-MNIST), its evaluation, and the
main functions of cls_train.py and cls_valid.py."""
from __future__ import annotations

import argparse
import logging
import time
from typing import Any, Dict, List, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from mdeq.core.data import BatchPlan, eval_loader, train_loader
from mdeq.core.metrics import correct_counts
from mdeq.core.run import RunContext, model_to_evaluate, setup_run
from mdeq.core.events import Hook, Phase, Task
from mdeq.core.trainer import progress
from mdeq.core.training import run_training
from mdeq.datasets import dataset_info, get_cls_dataset
from mdeq.models import get_cls_net
from mdeq.utils import distributed as du
from mdeq.utils.state_dict import load_pretrained, load_strict

logger = logging.getLogger(__name__)


@torch.no_grad()
def validate(ctx: RunContext, loader: DataLoader, model: nn.Module, criterion: nn.Module) -> Dict[str, float]:
    """Evaluates on this rank's shard and reduces over all ranks: the result covers the whole test set.

    Returns:
        ``loss``, ``top1``, ``top5`` (percent), ``count`` (images), ``forward_nstep`` (mean solver steps per
        batch) and ``time`` (seconds).
    """
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
    return result


def build_model(ctx: RunContext) -> nn.Module:
    """The classification MDEQ for the configured dataset, initialised from TRAIN.MODEL_FILE / MODEL.PRETRAINED."""
    cfg = ctx.cfg
    info = dataset_info(cfg)
    if info["num_classes"] != cfg.MODEL.NUM_CLASSES:
        raise ValueError(f"MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES} but the {cfg.DATASET.DATASET} data have "
                         f"{info['num_classes']} classes; set MODEL.NUM_CLASSES {info['num_classes']}")
    model = get_cls_net(cfg, in_channels=info["in_channels"])
    if cfg.MODEL.PRETRAINED:
        load_pretrained(model, cfg.MODEL.PRETRAINED)
    if cfg.TRAIN.MODEL_FILE:
        fmt = load_strict(model, cfg.TRAIN.MODEL_FILE)
        logger.info("=> initialised from TRAIN.MODEL_FILE %s (%s)", cfg.TRAIN.MODEL_FILE, fmt)
    return model


class ClassificationTask(Task):
    """Cross-entropy on labels; top-1/top-5 accuracy; the best model by validation Accuracy@1."""

    metric, metric_name, metric_format = "top1", "Accuracy@1", "%.3f"
    best_file, final_file = "model_best.pth.tar", "final_state.pth.tar"

    def __init__(self, ctx: RunContext, plan: BatchPlan) -> None:
        cfg = ctx.cfg
        self.ctx = ctx
        self.train_set = get_cls_dataset(cfg, train=True)  # data problems are reported first
        self.valid_loader = eval_loader(get_cls_dataset(cfg, train=False), cfg, ctx.device)
        self.data = train_loader(self.train_set, cfg, ctx.device, plan, cfg.PERCENT)
        self.criterion = nn.CrossEntropyLoss().to(ctx.device)

    def phases(self) -> List[Phase]:
        return [Phase("main", self.ctx.cfg.TRAIN.END_EPOCH, self.data, self.ctx.cfg)]

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.criterion(output, target)

    def batch_metrics(self, output: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
        c1, c5 = correct_counts(output, target, (1, 5)).tolist()
        n = target.shape[0]
        return {"top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n}

    def validate(self, model: nn.Module, step: int) -> Dict[str, Any]:
        return validate(self.ctx, self.valid_loader, model, self.criterion)


def run_train(args: argparse.Namespace, hooks: Sequence[Hook] = ()) -> Dict[str, Any]:
    """cls_train.py: trains, validates after every epoch, writes checkpoints; returns the last validation plus
    ``best_top1`` and ``train_time`` (see :func:`mdeq.core.training.run_training`).

    Args:
        args: the parsed command line.
        hooks: extra hooks (tests, benchmarks), called after the standard ones.
    """
    return run_training(args, ClassificationTask, build_model, hooks)


def run_valid(args: argparse.Namespace) -> Dict[str, float]:
    """cls_valid.py: evaluates TEST.MODEL_FILE (ours or an original .pkl) on the whole test set."""
    ctx = setup_run(args, "valid")
    cfg = ctx.cfg
    model_file = model_to_evaluate(ctx, ClassificationTask.final_file)
    info = dataset_info(cfg)
    model = get_cls_net(cfg, in_channels=info["in_channels"])
    fmt = load_strict(model, model_file)
    logger.info("=> evaluating %s (format: %s)", model_file, fmt)
    model = du.wrap_model(model, ctx.device)
    loader = eval_loader(get_cls_dataset(cfg, train=False), cfg, ctx.device)
    try:
        return validate(ctx, loader, model, nn.CrossEntropyLoss().to(ctx.device))
    finally:
        du.cleanup()
