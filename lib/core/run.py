"""Setting up a run: the checked config, the device and process group, seeds, folders and the log file.

Every tool starts here (:func:`setup_run`), then builds what its task needs.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from yacs.config import CfgNode as CN

from mdeq.config import check_config, get_default_config, update_config
from mdeq.core.optim import check_names
from mdeq.models.mdeq import deq_kwargs
from mdeq.modules.optimizations import tune_cpu_allocator
from mdeq.utils import distributed as du
from mdeq.utils.cluster import launcher_name
from mdeq.utils.logging_utils import setup_logger

logger = logging.getLogger(__name__)


@dataclass
class RunContext:
    """Everything a tool needs to know about where and how it runs."""

    cfg: CN
    device: torch.device
    cfg_name: str
    output_dir: str
    log_dir: str

    @property
    def rank(self) -> int:
        return du.get_rank()

    @property
    def world_size(self) -> int:
        return du.get_world_size()

    @property
    def is_main(self) -> bool:
        return du.is_main_process()


def seed_everything(seed: int) -> None:
    """Seeds Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def setup_run(args: argparse.Namespace, phase: str) -> RunContext:
    """Config (yaml + flags + options, checked, frozen), device, process group, seeds, folders, log file.

    Args:
        args: the parsed command line (:func:`mdeq.config.parse_args`).
        phase: ``train``, ``valid`` or ``test``: names the log file and the frozen config written beside it.
    """
    cfg = check_config(update_config(get_default_config(), args))
    check_names(cfg)  # optimizer and scheduler names, and (by translating the DEQ keys) the solver names
    deq_kwargs(cfg)
    cfg.freeze()
    device = du.select_device(cfg.DEVICE, getattr(args, "local_rank", None))
    du.init_distributed(device)
    cfg_name = os.path.splitext(os.path.basename(args.cfg))[0]
    dataset = cfg.DATASET.DATASET.lower()
    output_dir = os.path.join(cfg.OUTPUT_DIR, dataset, cfg_name)
    log_dir = os.path.join(cfg.LOG_DIR, dataset, cfg_name)
    if du.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        os.makedirs(log_dir, exist_ok=True)
    for folder in (output_dir, log_dir):  # several nodes must see the same folders (a clear error, not a hang)
        du.check_shared_folder(folder)
    setup_logger(log_dir, phase, cfg_name)
    if device.type == "cpu":
        tune_cpu_allocator()  # keeps the solvers' large buffers in the heap; changes no result
    if cfg.SEED >= 0:
        seed_everything(cfg.SEED + du.get_rank())
    if cfg.DETERMINISTIC:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.CUDNN.BENCHMARK and not cfg.DETERMINISTIC
        torch.backends.cudnn.deterministic = cfg.CUDNN.DETERMINISTIC or cfg.DETERMINISTIC
        torch.backends.cudnn.enabled = cfg.CUDNN.ENABLED
    if du.is_main_process():
        with open(os.path.join(log_dir, f"{cfg_name}_{phase}_config.yaml"), "w") as fh:
            fh.write(cfg.dump())
    logger.info("device %s, %d process(es) (launcher: %s), torch %s, %d CPU threads", device, du.get_world_size(),
                launcher_name(), torch.__version__, torch.get_num_threads())
    return RunContext(cfg=cfg, device=device, cfg_name=cfg_name, output_dir=output_dir, log_dir=log_dir)


def model_to_evaluate(ctx: RunContext, final_file: str) -> str:
    """The checkpoint an evaluation tool loads: TEST.MODEL_FILE (``--testModel``), else the run's final weights.

    Raises:
        FileNotFoundError: neither is there (the message says which and what to do).
    """
    model_file = ctx.cfg.TEST.MODEL_FILE or os.path.join(ctx.output_dir, final_file)
    if not ctx.cfg.TEST.MODEL_FILE and not os.path.isfile(model_file):
        raise FileNotFoundError(f"no model to evaluate: pass --testModel PATH (or TEST.MODEL_FILE), or train "
                                f"first so that {model_file} exists")
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"--testModel / TEST.MODEL_FILE {model_file} does not exist; check the path")
    return model_file
