"""The main function of every training tool: set up the run, build the task and the model, train."""
from __future__ import annotations

import argparse
import logging
from typing import Any, Callable, Dict, Optional, Sequence

from torch import nn

from mdeq.config.loader import tristate
from mdeq.core.checkpointing import recorded_layout, resume_path
from mdeq.core.data import BatchPlan, batch_plan
from mdeq.core.hooks import standard_hooks
from mdeq.core.run import RunContext, setup_run
from mdeq.core.events import Hook, Task
from mdeq.core.trainer import Trainer
from mdeq.models.layout_probe import apply_channels_last
from mdeq.utils import distributed as du
from mdeq.utils.summary import describe_model

logger = logging.getLogger(__name__)


def resume_in_recorded_layout(ctx: RunContext, model: nn.Module, resume_from: Optional[str]) -> nn.Module:
    """With MODEL.CHANNELS_LAST auto, a run resumed from ``resume_from`` keeps the memory layout that checkpoint
    was trained in (the probe may decide otherwise on a later start, and the other layout rounds differently);
    rank 0 reads the record and every rank follows. An explicit true / false is kept as the user set it."""
    if (resume_from is None or not hasattr(model, "channels_last")
            or tristate("MODEL.CHANNELS_LAST", ctx.cfg.MODEL.CHANNELS_LAST) != "auto"):
        return model
    recorded = du.broadcast_object(recorded_layout(resume_from) if du.is_main_process() else None)
    if recorded is None or recorded == bool(model.channels_last):
        return model
    logger.info("MODEL.CHANNELS_LAST auto: resuming in the layout the checkpoint was trained in (%s) instead of the "
                "probe's choice", "channels_last" if recorded else "contiguous")
    return apply_channels_last(model, recorded)


def run_training(args: argparse.Namespace, make_task: Callable[[RunContext, BatchPlan], Task],
                 make_model: Callable[[RunContext], nn.Module], hooks: Sequence[Hook] = ()) -> Dict[str, Any]:
    """Trains ``make_task``'s task with ``make_model``'s network as the command line says.

    The task is built first (data problems are reported before the model is built), the model is wrapped for
    several processes (SyncBatchNorm where the task asks and the device allows), and the standard hooks run
    before ``hooks``.

    Returns:
        The trainer's result (last validation, ``best``, ``train_time``, ``rank``) plus ``best_<metric>``.
    """
    ctx = setup_run(args, "train")
    plan = batch_plan(ctx.cfg, ctx.world_size)
    task = make_task(ctx, plan)
    resume_from = resume_path(ctx.cfg, ctx.output_dir)  # chosen once: the layout and the trainer follow it
    model = resume_in_recorded_layout(ctx, make_model(ctx), resume_from)
    logger.info(describe_model(model))
    model = du.wrap_model(model, ctx.device, sync_bn=task.sync_bn)
    trainer = Trainer(ctx, task, model, plan, standard_hooks(ctx, args.cfg, list(args.opts)) + list(hooks),
                      resume_from=resume_from)
    try:
        result = trainer.run()
    finally:
        du.cleanup()
    result[f"best_{task.metric}"] = result["best"]
    return result
