"""The segmentation tools' main functions: training (with resume and the extra phase) and evaluation.

Training runs epochs TRAIN.BEGIN_EPOCH .. TRAIN.END_EPOCH on DATASET.TRAIN_SET ("main" phase), then
TRAIN.EXTRA_EPOCH more epochs on DATASET.EXTRA_TRAIN_SET ("extra" phase) with a fresh optimizer whose base rate
is TRAIN.EXTRA_LR and a schedule that restarts over the extra epochs. The global step (which decides unrolled or
equilibrium mode) runs on across both phases.

Files in OUTPUT_DIR/<dataset>/<config name>/: ``checkpoint.pth.tar`` (resumable training state, written
atomically after every epoch; the one it replaces stays as ``checkpoint_prev.pth.tar``), ``best.pth`` (bare state
dict of the best validation mIoU), ``final_state.pth`` (bare state dict at the end) and, when training stops after
TRAIN.MAX_BAD_STEPS bad steps, ``last_good.pth.tar`` (resumable state before the failing batch).
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from yacs.config import CfgNode as CN

from mdeq.core.cls_runner import (prepare_output, resume_error, resume_path, save_resumable,
                                  training_checkpoint, warn_if_resharded)
from mdeq.core.engine import (BadStepGuard, ShardSampler, TrainingDiverged, make_loader,
                              restore_rng_state, save_last_good, setup_run, subset_percent, tensorboard_writer,
                              unwrap, wrap_model)
from mdeq.core.optim import build_optimizer, build_scheduler
from mdeq.core.seg_criterion import build_criterion
from mdeq.core.seg_function import train_one_epoch, validate
from mdeq.core.seg_inference import PredictionWriter, settings_from_cfg
from mdeq.datasets import get_seg_dataset
from mdeq.models import get_seg_net
from mdeq.utils import distributed as du
from mdeq.utils.checkpoint import (CheckpointError, load_pretrained, load_strict, load_training_checkpoint,
                                   save_checkpoint)
from mdeq.utils.summary import describe_model

logger = logging.getLogger(__name__)


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


def _class_weights(dataset) -> Optional[torch.Tensor]:
    weights = getattr(dataset, "class_weights", None)
    return None if weights is None else torch.as_tensor(weights, dtype=torch.float32)


def _phase_cfg(cfg: CN, phase: str) -> CN:
    """The config the optimizer and scheduler of a phase are built from (extra: EXTRA_LR over EXTRA_EPOCH)."""
    if phase == "main":
        return cfg
    out = cfg.clone()
    out.defrost()
    out.TRAIN.LR = cfg.TRAIN.EXTRA_LR
    out.TRAIN.END_EPOCH = cfg.TRAIN.EXTRA_EPOCH
    out.freeze()
    return out


def run_train(args: argparse.Namespace) -> Dict[str, Any]:
    """seg_train.py: trains, validates (mIoU) after every epoch, writes checkpoints.

    Returns:
        The last validation (``mIoU``, ``IoU``, ``pixel_acc``, ...) plus ``best_mIoU``, ``train_time`` and
        ``rank``.
    """
    ctx = setup_run(args, "train")
    cfg = ctx.cfg
    prepare_output(ctx)
    train_full = get_seg_dataset(cfg, "train")  # data problems are reported before the model is built
    valid_set = get_seg_dataset(cfg, "val")
    if not valid_set.has_labels:
        raise ValueError(f"DATASET.TEST_SET {cfg.DATASET.TEST_SET} has no labels; training validates on it, so "
                         f"point it at a labelled list such as list/cityscapes/val.lst")
    model, _ = build_model(cfg)
    logger.info(describe_model(model))
    model = wrap_model(model, ctx, sync_bn=True)

    criterion = build_criterion(cfg, _class_weights(train_full)).to(ctx.device)
    loaders = {"main": make_loader(subset_percent(train_full, cfg.PERCENT), ctx, cfg.TRAIN.BATCH_SIZE_PER_GPU,
                                   train=True)}
    end_epoch = cfg.TRAIN.END_EPOCH
    last_epoch = end_epoch + (cfg.TRAIN.EXTRA_EPOCH if cfg.TRAIN.EXTRA_EPOCH > 0 else 0)
    if last_epoch > end_epoch:
        loaders["extra"] = make_loader(get_seg_dataset(cfg, "extra_train"), ctx, cfg.TRAIN.BATCH_SIZE_PER_GPU,
                                       train=True)
    valid_loader = make_loader(valid_set, ctx, cfg.TEST.BATCH_SIZE_PER_GPU, train=False)
    settings = settings_from_cfg(cfg, training=True)

    def phase_of(epoch: int) -> str:
        return "main" if epoch < end_epoch else "extra"

    def build_phase(phase: str):
        pcfg = _phase_cfg(cfg, phase)
        optimizer = build_optimizer(pcfg, model)
        return optimizer, build_scheduler(pcfg, optimizer, len(loaders[phase]))

    begin_epoch, best_miou = cfg.TRAIN.BEGIN_EPOCH, 0.0
    state = {"step": begin_epoch * len(loaders["main"]), "start_batch": 0}
    phase = phase_of(begin_epoch)
    optimizer, scheduler = build_phase(phase)
    path = resume_path(ctx)
    if path:
        try:
            ckpt = load_training_checkpoint(path)
            begin_epoch = int(ckpt["epoch"])
            phase = str(ckpt.get("phase", phase_of(begin_epoch)))
            if phase not in ("main", "extra") or (phase == "extra" and "extra" not in loaders):
                raise ValueError(f"the checkpoint is in training phase {phase!r}, which this config does not have")
            unwrap(model).load_state_dict(ckpt["state_dict"])
            optimizer, scheduler = build_phase(phase)
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["lr_scheduler"])
        except (CheckpointError, KeyError, ValueError, RuntimeError) as exc:
            raise resume_error(path, exc) from None
        best_miou = float(ckpt.get("best_mIoU", ckpt.get("best_perf", 0.0)))
        state = {"step": int(ckpt.get("step", begin_epoch * len(loaders["main"]))),
                 "start_batch": int(ckpt.get("batch", 0))}
        restore_rng_state(ckpt)
        warn_if_resharded(ctx, ckpt, path)
        logger.info("=> resumed from %s: epoch %d (%s phase), step %d, batch %d, best mIoU %.4f", path,
                    begin_epoch, phase, state["step"], state["start_batch"], best_miou)

    writer = tensorboard_writer(ctx)
    guard = BadStepGuard(cfg.TRAIN.MAX_BAD_STEPS)
    ckpt_file = os.path.join(ctx.output_dir, "checkpoint.pth.tar")
    result: Dict[str, Any] = {}
    train_start = time.time()

    def checkpoint(epoch: int, miou: float, batch: int = 0,
                   rngs: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
        ckpt = training_checkpoint(ctx, model, optimizer, scheduler, epoch, state, miou, best_miou, batch, rngs)
        ckpt.update(best_mIoU=float(best_miou), phase=phase)
        return ckpt

    for epoch in range(begin_epoch, last_epoch):
        if phase_of(epoch) != phase:
            phase = phase_of(epoch)
            optimizer, scheduler = build_phase(phase)
            logger.info("=> extra phase: %d epochs on %s, lr %g", cfg.TRAIN.EXTRA_EPOCH,
                        cfg.DATASET.EXTRA_TRAIN_SET, cfg.TRAIN.EXTRA_LR)
        loader = loaders[phase]
        sampler: ShardSampler = loader.sampler  # type: ignore[assignment]
        sampler.set_epoch(epoch)
        sampler.set_start(state["start_batch"] * cfg.TRAIN.BATCH_SIZE_PER_GPU)
        every = cfg.TRAIN.CHECKPOINT_EVERY_STEPS
        steps_this_epoch = len(loader) + state["start_batch"]

        def on_step(batch: int, epoch: int = epoch, total: int = steps_this_epoch) -> None:
            if every > 0 and state["step"] % every == 0 and batch + 1 < total:
                save_resumable(ctx, ckpt_file, lambda rngs: checkpoint(epoch, best_miou, batch + 1, rngs))

        try:
            train_one_epoch(ctx, loader, model, criterion, optimizer, scheduler, epoch, state, guard, writer,
                            on_step)
        except TrainingDiverged as exc:  # resumable at the batch that failed, with the weights before it
            raise save_last_good(ctx, lambda epoch=epoch: checkpoint(epoch, 0.0, state["batch"]), exc) from None
        sampler.set_start(0)
        result = validate(ctx, valid_loader, model, settings, valid_set.num_classes, valid_set.class_names,
                          writer, state["step"])
        miou = result["mIoU"]
        is_best = miou > best_miou or not os.path.isfile(os.path.join(ctx.output_dir, "best.pth"))
        best_miou = max(best_miou, miou)
        save_resumable(ctx, ckpt_file, lambda rngs: checkpoint(epoch + 1, miou, rngs=rngs))
        if ctx.is_main:
            if is_best:
                save_checkpoint(unwrap(model).state_dict(), os.path.join(ctx.output_dir, "best.pth"))
            logger.info("=> saved checkpoint (epoch %d, mIoU %.4f, best %.4f) to %s", epoch + 1, miou, best_miou,
                        ctx.output_dir)
        du.barrier()

    if not result:  # nothing left to train (a finished run resumed): still report the model's mIoU
        result = validate(ctx, valid_loader, model, settings, valid_set.num_classes, valid_set.class_names)
    train_time = time.time() - train_start
    if ctx.is_main:
        final = os.path.join(ctx.output_dir, "final_state.pth")
        save_checkpoint(unwrap(model).state_dict(), final)
        logger.info("=> training took %.1f s; final state in %s", train_time, final)
    if writer is not None:
        writer.close()
    result = dict(result, train_time=train_time, best_mIoU=best_miou, rank=ctx.rank)
    du.cleanup()
    return result


def run_test(args: argparse.Namespace) -> Dict[str, Any]:
    """seg_test.py: evaluates TEST.MODEL_FILE on DATASET.TEST_SET with the TEST.* inference settings.

    A labelled list is scored (per-class IoU, mIoU, pixel accuracy); with TEST.SAVE_PREDICTIONS its colourised
    predictions, overlays and label-id maps are written. An image-only list (the test split) always gets its
    label-id maps written (the benchmark submission), plus colours and overlays with TEST.SAVE_PREDICTIONS.
    Files go to TEST.OUTPUT_DIR, or ``<log dir>/predictions``; each process writes the images it evaluated.

    Returns:
        The validation dict of :func:`mdeq.core.seg_function.validate` plus ``has_labels``, ``output_dir``
        (None when nothing was written), ``written`` (images written by this process) and ``rank``.
    """
    ctx = setup_run(args, "test")
    cfg = ctx.cfg
    model_file = cfg.TEST.MODEL_FILE or os.path.join(ctx.output_dir, "final_state.pth")
    if not cfg.TEST.MODEL_FILE and not os.path.isfile(model_file):
        raise FileNotFoundError(f"no model to evaluate: pass --testModel PATH (or TEST.MODEL_FILE), or train "
                                f"first so that {model_file} exists")
    model, fmt = load_test_model(cfg, model_file)
    logger.info("=> evaluating %s (format: %s)", model_file, fmt)
    model = model.to(ctx.device)
    dataset = get_seg_dataset(cfg, "val")
    loader = make_loader(dataset, ctx, cfg.TEST.BATCH_SIZE_PER_GPU, train=False)
    settings = settings_from_cfg(cfg)
    logger.info("inference: scales %s, flip %s, sliding-window crop (h, w) %s%s", list(settings.scales),
                settings.flip, settings.crop_size,
                f", long side of scale 1: {settings.base_size}" if settings.base_size else "")
    out_dir = None
    writer = None
    if cfg.TEST.SAVE_PREDICTIONS or not dataset.has_labels:
        out_dir = cfg.TEST.OUTPUT_DIR or os.path.join(ctx.log_dir, "predictions")
        writer = PredictionWriter(dataset, out_dir, color=bool(cfg.TEST.SAVE_PREDICTIONS), label_ids=True)
    result = validate(ctx, loader, model, settings, dataset.num_classes, dataset.class_names,
                      prediction_writer=writer)
    if writer is not None:
        logger.info("=> wrote predictions of %d image(s) to %s", writer.count, out_dir)
    if not dataset.has_labels:
        logger.info("DATASET.TEST_SET %s has no labels: no scores; the label-id maps in %s are the "
                    "benchmark submission", cfg.DATASET.TEST_SET, os.path.join(out_dir or "", "label_ids"))
    result.update(has_labels=dataset.has_labels, output_dir=out_dir, written=writer.count if writer else 0,
                  rank=ctx.rank)
    du.cleanup()
    return result
