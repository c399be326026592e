"""The main function of every training tool: set up the run, build the task and the model, train."""
from __future__ import annotations

import argparse
import logging
from typing import Any, Callable, Dict, Sequence

from torch import nn

from mdeq.core.data import BatchPlan, batch_plan
from mdeq.core.hooks import standard_hooks
from mdeq.core.run import RunContext, setup_run
from mdeq.core.events import Hook, Task
from mdeq.core.trainer import Trainer
from mdeq.utils import distributed as du
from mdeq.utils.summary import describe_model

logger = logging.getLogger(__name__)


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
    model = make_model(ctx)
    logger.info(describe_model(model))
    model = du.wrap_model(model, ctx.device, sync_bn=task.sync_bn)
    trainer = Trainer(ctx, task, model, plan, standard_hooks(ctx, args.cfg, list(args.opts)) + list(hooks))
    try:
        result = trainer.run()
    finally:
        du.cleanup()
    result[f"best_{task.metric}"] = result["best"]
    return result
