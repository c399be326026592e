"""The classification tools' main functions: training (with resume) and evaluation of a checkpoint."""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from mdeq.core.cls_function import train_one_epoch, validate
from mdeq.core.engine import (BadStepGuard, RunContext, ShardSampler, TrainingDiverged, all_rng_states, make_loader,
                              restore_rng_state, rng_state, save_last_good, setup_run, subset_percent,
                              tensorboard_writer, unwrap, wrap_model)
from mdeq.core.optim import build_optimizer, build_scheduler
from mdeq.datasets import dataset_info, get_cls_dataset
from mdeq.models import get_cls_net
from mdeq.utils import distributed as du
from mdeq.utils.checkpoint import (CheckpointError, load_pretrained, load_strict, load_training_checkpoint,
                                   keep_previous, newest_valid_checkpoint, previous_path, remove_partial_files,
                                   save_checkpoint)
from mdeq.utils.summary import describe_model

logger = logging.getLogger(__name__)


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


def training_checkpoint(ctx: RunContext, model: nn.Module, optimizer, scheduler, epoch: int, state: Dict[str, Any],
                        perf: float, best_perf: float, batch: int = 0,
                        rngs: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Everything needed to continue exactly: weights, optimizer, scheduler, counters and random generators.

    ``rngs``: every rank's generator states (as :func:`save_resumable` gathers them); without it only this
    process's state is saved, which every rank then resumes from.
    """
    ckpt = {"epoch": epoch, "step": state["step"], "batch": batch, "world_size": ctx.world_size,
            "model": ctx.cfg.MODEL.NAME,
            "state_dict": unwrap(model).state_dict(), "perf": float(perf), "best_perf": float(best_perf),
            "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
            "rng": rngs[0] if rngs else rng_state(), "config": ctx.cfg.dump()}
    if rngs:
        ckpt["rng_per_rank"] = list(rngs)
    return ckpt


def save_resumable(ctx: RunContext, path: str, make: Callable[[List[Dict[str, Any]]], Dict[str, Any]]) -> None:
    """Writes a training checkpoint: every rank calls this (it gathers every rank's random-generator states);
    rank 0 then keeps the current ``path`` under its second name and writes ``make(rngs)`` atomically."""
    rngs = all_rng_states()
    if ctx.is_main:
        keep_previous(path)
        save_checkpoint(make(rngs), path)


# every file the training tools write into the output folder (classification and segmentation)
CHECKPOINT_NAMES = ("checkpoint.pth.tar", "checkpoint_prev.pth.tar", "last_good.pth.tar", "model_best.pth.tar",
                    "final_state.pth.tar", "best.pth", "final_state.pth")


def resume_candidates(ctx: RunContext) -> List[str]:
    """The training checkpoints AUTO_RESUME chooses among: the latest, the one it replaced, and the last good state
    of a run that diverged."""
    latest = os.path.join(ctx.output_dir, "checkpoint.pth.tar")
    return [latest, previous_path(latest), os.path.join(ctx.output_dir, "last_good.pth.tar")]


def resume_path(ctx: RunContext) -> Optional[str]:
    """The checkpoint to resume from (TRAIN.CHECKPOINT, AUTO_RESUME, TRAIN.RESUME), or None to start afresh.

    AUTO_RESUME takes the readable candidate with the highest (epoch, step); a candidate that cannot be read (cut
    off by a full disk or a broken copy, or refused as unsafe) is skipped with a warning and renamed
    ``<name>.unusable``.
    """
    cfg = ctx.cfg
    default = os.path.join(ctx.output_dir, "checkpoint.pth.tar")
    if cfg.TRAIN.CHECKPOINT:
        return cfg.TRAIN.CHECKPOINT
    if cfg.AUTO_RESUME:  # rank 0 chooses (and moves unusable files aside); every rank resumes from its choice
        chosen = None
        if ctx.is_main:
            found = newest_valid_checkpoint(resume_candidates(ctx), set_aside=True)
            chosen = found[0] if found else None
            if chosen is None:
                logger.info("AUTO_RESUME: no readable checkpoint in %s; starting from scratch", ctx.output_dir)
        return du.broadcast_object(chosen)
    if cfg.TRAIN.RESUME and os.path.isfile(default):
        return default
    if cfg.TRAIN.RESUME:
        logger.info("TRAIN.RESUME is set but %s does not exist yet; starting from scratch", default)
    return None


def resume_error(path: str, exc: Exception) -> CheckpointError:
    """The error for a checkpoint that cannot be resumed from: what is wrong and the ways out."""
    return CheckpointError(f"cannot resume from {path}: {str(exc).rstrip('.')}. The file is left as it is; delete "
                           f"or move it (or set TRAIN.RESUME False) to start afresh, or set AUTO_RESUME True to "
                           f"fall back to the newest readable checkpoint.")


def warn_if_resharded(ctx: RunContext, ckpt: Dict[str, Any], path: str) -> None:
    """A mid-epoch checkpoint counts batches per process; resumed by another number of processes, the rest of that
    epoch sees the samples in another order (some twice, some not at all). Says so."""
    saved = int(ckpt.get("world_size", ctx.world_size))
    if int(ckpt.get("batch", 0)) > 0 and saved != ctx.world_size:
        logger.warning("%s was written mid-epoch by %d process(es) and is resumed by %d: the rest of epoch %d does "
                       "not continue the same sample order (resume from an epoch-end checkpoint, or with %d "
                       "processes, for that)", path, saved, ctx.world_size, int(ckpt["epoch"]), saved)


def prepare_output(ctx: RunContext) -> None:
    """Rank 0, before training: clears partial checkpoint files that a killed run left in the output folder."""
    if ctx.is_main:
        remove_partial_files(ctx.output_dir, CHECKPOINT_NAMES)
    du.barrier()


def run_train(args: argparse.Namespace) -> Dict[str, float]:
    """cls_train.py: trains, validates after every epoch, writes checkpoints; returns the last validation."""
    ctx = setup_run(args, "train")
    cfg = ctx.cfg
    prepare_output(ctx)
    train_set = subset_percent(get_cls_dataset(cfg, train=True), cfg.PERCENT)  # data problems are reported first
    valid_set = get_cls_dataset(cfg, train=False)
    model = build_model(ctx)
    logger.info(describe_model(model))
    model = wrap_model(model, ctx)
    train_loader = make_loader(train_set, ctx, cfg.TRAIN.BATCH_SIZE_PER_GPU, train=True)
    valid_loader = make_loader(valid_set, ctx, cfg.TEST.BATCH_SIZE_PER_GPU, train=False)
    steps_per_epoch = len(train_loader)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    criterion = nn.CrossEntropyLoss().to(ctx.device)

    begin_epoch, best_perf, state = cfg.TRAIN.BEGIN_EPOCH, 0.0, {"step": cfg.TRAIN.BEGIN_EPOCH * steps_per_epoch,
                                                                 "start_batch": 0}
    path = resume_path(ctx)
    if path:
        try:
            ckpt = load_training_checkpoint(path)
            unwrap(model).load_state_dict(ckpt["state_dict"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["lr_scheduler"])
        except (CheckpointError, KeyError, ValueError, RuntimeError) as exc:
            raise resume_error(path, exc) from None
        begin_epoch, best_perf = int(ckpt["epoch"]), float(ckpt.get("best_perf", ckpt.get("perf", 0.0)))
        state = {"step": int(ckpt.get("step", begin_epoch * steps_per_epoch)), "start_batch": int(ckpt.get("batch", 0))}
        restore_rng_state(ckpt)
        warn_if_resharded(ctx, ckpt, path)
        logger.info("=> resumed from %s: epoch %d, step %d, batch %d, best Accuracy@1 %.3f", path, begin_epoch,
                    state["step"], state["start_batch"], best_perf)

    writer = tensorboard_writer(ctx)
    guard = BadStepGuard(cfg.TRAIN.MAX_BAD_STEPS)
    sampler: ShardSampler = train_loader.sampler  # type: ignore[assignment]
    ckpt_file = os.path.join(ctx.output_dir, "checkpoint.pth.tar")
    result: Dict[str, float] = {}
    train_start = time.time()

    for epoch in range(begin_epoch, cfg.TRAIN.END_EPOCH):
        sampler.set_epoch(epoch)
        sampler.set_start(state["start_batch"] * cfg.TRAIN.BATCH_SIZE_PER_GPU)
        every = cfg.TRAIN.CHECKPOINT_EVERY_STEPS

        def on_step(batch: int, epoch: int = epoch) -> None:
            if every > 0 and state["step"] % every == 0 and batch + 1 < steps_per_epoch:
                save_resumable(ctx, ckpt_file, lambda rngs: training_checkpoint(
                    ctx, model, optimizer, scheduler, epoch, state, best_perf, best_perf, batch + 1, rngs))

        try:
            train_one_epoch(ctx, train_loader, model, criterion, optimizer, scheduler, epoch, state, guard,
                            writer, on_step)
        except TrainingDiverged as exc:  # resumable at the batch that failed, with the weights before it
            raise save_last_good(ctx, lambda epoch=epoch: training_checkpoint(
                ctx, model, optimizer, scheduler, epoch, state, 0.0, best_perf, state["batch"]), exc) from None
        sampler.set_start(0)
        result = validate(ctx, valid_loader, model, criterion, writer, state["step"])
        perf = result["top1"]
        best_file = os.path.join(ctx.output_dir, "model_best.pth.tar")
        is_best = perf > best_perf or not os.path.isfile(best_file)  # the first epoch is the best so far, even at 0 %
        best_perf = max(best_perf, perf)
        save_resumable(ctx, ckpt_file, lambda rngs: training_checkpoint(
            ctx, model, optimizer, scheduler, epoch + 1, state, perf, best_perf, rngs=rngs))
        if ctx.is_main:
            if is_best:
                save_checkpoint(unwrap(model).state_dict(), best_file)
            logger.info("=> saved checkpoint (epoch %d, Accuracy@1 %.3f, best %.3f, %.1f s of training) to %s",
                        epoch + 1, perf, best_perf, time.time() - train_start, ctx.output_dir)
        du.barrier()

    train_time = time.time() - train_start
    if ctx.is_main:
        save_checkpoint(unwrap(model).state_dict(), os.path.join(ctx.output_dir, "final_state.pth.tar"))
        logger.info("=> training took %.1f s; final state in %s", train_time,
                    os.path.join(ctx.output_dir, "final_state.pth.tar"))
    if writer is not None:
        writer.close()
    result = dict(result, train_time=train_time, best_top1=best_perf)
    du.cleanup()
    return result


def run_valid(args: argparse.Namespace) -> Dict[str, float]:
    """cls_valid.py: evaluates TEST.MODEL_FILE (ours or an original .pkl) on the whole test set."""
    ctx = setup_run(args, "valid")
    cfg = ctx.cfg
    if not cfg.TEST.MODEL_FILE:
        default = os.path.join(ctx.output_dir, "final_state.pth.tar")
        if not os.path.isfile(default):
            raise FileNotFoundError(f"no model to evaluate: pass --testModel PATH (or TEST.MODEL_FILE), or train "
                                    f"first so that {default} exists")
        model_file = default
    else:
        model_file = cfg.TEST.MODEL_FILE
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"--testModel / TEST.MODEL_FILE {model_file} does not exist; check the path")
    info = dataset_info(cfg)
    model = get_cls_net(cfg, in_channels=info["in_channels"])
    fmt = load_strict(model, model_file)
    logger.info("=> evaluating %s (format: %s)", model_file, fmt)
    model = wrap_model(model, ctx)
    loader = make_loader(get_cls_dataset(cfg, train=False), ctx, cfg.TEST.BATCH_SIZE_PER_GPU, train=False)
    result = validate(ctx, loader, model, nn.CrossEntropyLoss().to(ctx.device))
    du.cleanup()
    return result
