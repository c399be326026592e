"""Semantic checks of a merged configuration: each failure names the key and how to fix it."""
from __future__ import annotations

from typing import Any, List

import torch
from yacs.config import CfgNode as CN

from .default import get_default_config
from .loader import ConfigError, _coerce, resolve_alias


def _check_types(cfg: CN, ref: CN, prefix: str, errors: List[str]) -> None:
    for key, default in ref.items():
        full = prefix + key
        if key not in cfg:
            errors.append(f"config key {full} is missing; start from get_default_config()")
            continue
        value = cfg[key]
        if isinstance(default, CN):
            if not isinstance(value, CN):
                errors.append(f"config key {full} must be a section")
            else:
                _check_types(value, default, full + ".", errors)
            continue
        try:
            _coerce(full, default, value)
        except ConfigError as exc:
            errors.append(str(exc))
    for key in cfg.keys():
        if key not in ref:
            errors.append(f"unknown config key {prefix + key}")


def _choice(errors: List[str], key: str, value: Any, valid: List[str]) -> None:
    if str(value).lower() not in valid:
        errors.append(f"config key {key}: unknown name {value!r}; valid names are {', '.join(valid)}")


def check_config(cfg: CN) -> CN:
    """Validates cfg and returns it; raises ConfigError listing every problem found.

    Checks value types against the defaults, consistent branch lists, GroupNorm divisibility, the values of
    the keys whose choices are fixed here, positive thresholds, tolerances and batch sizes. Names that select
    an implementation from a registry of a higher floor (DEQ.F_SOLVER / B_SOLVER, TRAIN.OPTIMIZER /
    LR_SCHEDULER) are checked where they are built (``mdeq.models.mdeq.deq_kwargs``, ``mdeq.core.optim``).
    """
    errors: List[str] = []
    _check_types(cfg, get_default_config(), "", errors)
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))

    stage = cfg.MODEL.EXTRA.FULL_STAGE
    nb = stage.NUM_BRANCHES
    prefix = "MODEL.EXTRA.FULL_STAGE."
    if nb < 1:
        errors.append(f"{prefix}NUM_BRANCHES must be at least 1, got {nb}")
    for name, required in (("NUM_CHANNELS", True), ("NUM_BLOCKS", True), ("HEAD_CHANNELS", False),
                           ("BIG_KERNELS", False)):
        value = list(stage[name])
        if (required or value) and len(value) != nb:
            errors.append(f"{prefix}NUM_BRANCHES is {nb} but {prefix}{name} has {len(value)} entries "
                          f"({value}); give one entry per branch")
    groups = cfg.MODEL.NUM_GROUPS
    if groups < 1:
        errors.append(f"MODEL.NUM_GROUPS must be at least 1, got {groups}")
    else:
        post_groups = max(groups // 2, 1)
        for i, ch in enumerate(stage.NUM_CHANNELS):
            if ch <= 0:
                errors.append(f"{prefix}NUM_CHANNELS[{i}] must be positive, got {ch}")
            elif ch % groups or (ch * cfg.MODEL.EXPANSION_FACTOR) % groups or ch % post_groups:
                errors.append(f"{prefix}NUM_CHANNELS[{i}] = {ch} (and {ch} x EXPANSION_FACTOR "
                              f"{cfg.MODEL.EXPANSION_FACTOR}) must be divisible by MODEL.NUM_GROUPS = {groups}; "
                              f"change the channels or the number of groups")
    for i, n in enumerate(stage.NUM_BLOCKS):
        if n < 1:
            errors.append(f"{prefix}NUM_BLOCKS[{i}] must be at least 1, got {n}")
    for i, n in enumerate(stage.BIG_KERNELS):
        if n not in (0, 1, 2):
            errors.append(f"{prefix}BIG_KERNELS[{i}] must be 0, 1 or 2, got {n}")
    if stage.BLOCK.upper() != "BASIC":
        errors.append(f"{prefix}BLOCK: unknown block {stage.BLOCK!r}; valid names are BASIC")
    if stage.FUSE_METHOD.upper() != "SUM":
        errors.append(f"{prefix}FUSE_METHOD: unknown fuse method {stage.FUSE_METHOD!r}; valid names are SUM")
    if stage.NUM_MODULES != 1:
        errors.append(f"{prefix}NUM_MODULES must be 1 (an MDEQ has one f_theta), got {stage.NUM_MODULES}")
    if cfg.MODEL.DOWNSAMPLE_TIMES not in (0, 1, 2):
        errors.append(f"MODEL.DOWNSAMPLE_TIMES must be 0, 1 or 2, got {cfg.MODEL.DOWNSAMPLE_TIMES}")
    if cfg.MODEL.EXPANSION_FACTOR < 1:
        errors.append(f"MODEL.EXPANSION_FACTOR must be at least 1, got {cfg.MODEL.EXPANSION_FACTOR}")
    if not 0.0 <= cfg.MODEL.DROPOUT < 1.0:
        errors.append(f"MODEL.DROPOUT must be in [0, 1), got {cfg.MODEL.DROPOUT}")
    if cfg.MODEL.NUM_LAYERS < 1:
        errors.append(f"MODEL.NUM_LAYERS must be at least 1, got {cfg.MODEL.NUM_LAYERS}")
    if cfg.MODEL.EXTRA.FINAL_CONV_KERNEL not in (1, 3):
        errors.append(f"MODEL.EXTRA.FINAL_CONV_KERNEL must be 1 or 3, got {cfg.MODEL.EXTRA.FINAL_CONV_KERNEL}")

    for key in ("F_THRES", "B_THRES"):
        for section in ("MODEL", "DEQ"):
            if cfg[section][key] <= 0:
                errors.append(f"{section}.{key} must be a positive number of iterations, got {cfg[section][key]}")
        try:
            resolve_alias(cfg, key)
        except ConfigError as exc:
            errors.append(str(exc))
    try:
        f_cap = resolve_alias(cfg, "F_THRES")
    except ConfigError:  # already reported above
        f_cap = cfg.DEQ.F_THRES
    if cfg.DEQ.EVAL_F_THRES < 0:
        errors.append(f"DEQ.EVAL_F_THRES must be 0 (use F_THRES) or positive, got {cfg.DEQ.EVAL_F_THRES}")
    for key in ("F_EPS", "B_EPS"):
        if cfg.DEQ[key] != -1.0 and cfg.DEQ[key] <= 0:
            errors.append(f"DEQ.{key} must be positive (or -1 for the original's tolerance), got {cfg.DEQ[key]}")
    if cfg.DEQ.STALL_STEPS < 0:
        errors.append(f"DEQ.STALL_STEPS must be 0 (off) or positive, got {cfg.DEQ.STALL_STEPS}")
    if cfg.LOSS.JAC_LOSS_VECS < 1:
        errors.append(f"LOSS.JAC_LOSS_VECS must be at least 1, got {cfg.LOSS.JAC_LOSS_VECS}")
    if cfg.DEQ.RAND_F_THRES_DELTA < 0 or cfg.DEQ.RAND_F_THRES_DELTA >= f_cap:
        errors.append(f"DEQ.RAND_F_THRES_DELTA must be in [0, F_THRES), got {cfg.DEQ.RAND_F_THRES_DELTA}")
    if cfg.DEQ.LBROYDEN_MEM < 1:
        errors.append(f"DEQ.LBROYDEN_MEM must be at least 1, got {cfg.DEQ.LBROYDEN_MEM}")
    if cfg.DEQ.CHECK_EVERY < 0:
        errors.append(f"DEQ.CHECK_EVERY must be 0 (automatic) or positive, got {cfg.DEQ.CHECK_EVERY}")
    if cfg.DEQ.ANDERSON_M < 1:
        errors.append(f"DEQ.ANDERSON_M must be at least 1, got {cfg.DEQ.ANDERSON_M}")
    if cfg.DEQ.PHANTOM_STEPS < 1:
        errors.append(f"DEQ.PHANTOM_STEPS must be at least 1, got {cfg.DEQ.PHANTOM_STEPS}")
    if not 0.0 < cfg.DEQ.PHANTOM_TAU <= 1.0:
        errors.append(f"DEQ.PHANTOM_TAU must be in (0, 1], got {cfg.DEQ.PHANTOM_TAU}")
    for key, valid in (("STOP_MODE", ["abs", "rel"]), ("BACKWARD", ["implicit", "phantom"]),
                       ("B_CAP", ["forward", "b_thres"]), ("STOP_SCOPE", ["batch", "sample"]),
                       ("ADJOINT_INIT", ["zeros", "grad"]), ("ADJOINT_AT", ["f_z", "z"]),
                       ("RAND_F_THRES_MODE", ["jac_steps", "every_step"]),
                       ("LBROYDEN_OVERFLOW", ["circular", "window", "restart"])):
        _choice(errors, "DEQ." + key, cfg.DEQ[key], valid)
    _choice(errors, "LOSS.PRETRAIN_JAC_AT", cfg.LOSS.PRETRAIN_JAC_AT, ["detached", "last"])
    _choice(errors, "DEVICE", cfg.DEVICE, ["auto", "cpu", "cuda"])

    if cfg.MODEL.COMPILE and not hasattr(torch, "compile"):
        errors.append(f"MODEL.COMPILE needs torch.compile (PyTorch 2.0 or newer; this is {torch.__version__}); "
                      "set MODEL.COMPILE False or upgrade PyTorch")
    if cfg.TRAIN.LR <= 0:
        errors.append(f"TRAIN.LR must be positive, got {cfg.TRAIN.LR}")
    for section in ("TRAIN", "TEST"):
        if cfg[section].BATCH_SIZE_PER_GPU < 1:
            errors.append(f"{section}.BATCH_SIZE_PER_GPU must be at least 1, got {cfg[section].BATCH_SIZE_PER_GPU}")
    if not 0.0 < cfg.PERCENT <= 1.0:
        errors.append(f"PERCENT must be in (0, 1], got {cfg.PERCENT}")
    if cfg.PRINT_FREQ < 1:
        errors.append(f"PRINT_FREQ must be at least 1, got {cfg.PRINT_FREQ}")
    if cfg.WORKERS < 0:
        errors.append(f"WORKERS must be 0 or more, got {cfg.WORKERS}")
    if cfg.TRAIN.END_EPOCH < cfg.TRAIN.BEGIN_EPOCH:
        errors.append(f"TRAIN.END_EPOCH ({cfg.TRAIN.END_EPOCH}) is before TRAIN.BEGIN_EPOCH "
                      f"({cfg.TRAIN.BEGIN_EPOCH})")
    if cfg.TRAIN.PRETRAIN_STEPS < 0:
        errors.append(f"TRAIN.PRETRAIN_STEPS must be 0 or more, got {cfg.TRAIN.PRETRAIN_STEPS}")
    if not 0.0 <= cfg.LOSS.JAC_LOSS_FREQ <= 1.0:
        errors.append(f"LOSS.JAC_LOSS_FREQ is a probability in [0, 1], got {cfg.LOSS.JAC_LOSS_FREQ}")
    if cfg.LOSS.JAC_LOSS_WEIGHT < 0 or cfg.LOSS.PRETRAIN_JAC_LOSS_WEIGHT < 0:
        errors.append("LOSS.JAC_LOSS_WEIGHT and LOSS.PRETRAIN_JAC_LOSS_WEIGHT must be 0 or more")
    if cfg.LOSS.OHEMKEEP < 1 or not 0.0 < cfg.LOSS.OHEMTHRES <= 1.0:
        errors.append("LOSS.OHEMKEEP must be at least 1 and LOSS.OHEMTHRES in (0, 1]")
    if cfg.TRAIN.MAX_BAD_STEPS < 1:
        errors.append(f"TRAIN.MAX_BAD_STEPS must be at least 1, got {cfg.TRAIN.MAX_BAD_STEPS}")
    for key in ("MODEL.IMAGE_SIZE", "TRAIN.IMAGE_SIZE", "TEST.IMAGE_SIZE"):
        section, name = key.split(".")
        size = list(cfg[section][name])
        if len(size) != 2 or min(size) < 1:
            errors.append(f"{key} must be [width, height] with positive entries, got {size}")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    return cfg
