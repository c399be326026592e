"""Optimizers and learning-rate schedulers by name, with the original project's semantics."""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable

import torch
from yacs.config import CfgNode as CN


def _sgd(params: Iterable, cfg: CN) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.TRAIN.LR, momentum=cfg.TRAIN.MOMENTUM, weight_decay=cfg.TRAIN.WD,
                           nesterov=cfg.TRAIN.NESTEROV and cfg.TRAIN.MOMENTUM > 0)


def _adam(params: Iterable, cfg: CN) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.TRAIN.LR, weight_decay=cfg.TRAIN.WD)


def _adamw(params: Iterable, cfg: CN) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.TRAIN.LR, weight_decay=cfg.TRAIN.WD)


def _rmsprop(params: Iterable, cfg: CN) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=cfg.TRAIN.LR, momentum=cfg.TRAIN.MOMENTUM, weight_decay=cfg.TRAIN.WD,
                               alpha=cfg.TRAIN.GAMMA1)


OPTIMIZERS: Dict[str, Callable[[Iterable, CN], torch.optim.Optimizer]] = {
    "sgd": _sgd, "adam": _adam, "adamw": _adamw, "rmsprop": _rmsprop,
}


def build_optimizer(cfg: CN, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer named by TRAIN.OPTIMIZER over the model's trainable parameters."""
    name = cfg.TRAIN.OPTIMIZER.lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"TRAIN.OPTIMIZER: unknown optimizer {name!r}; valid names are {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name]([p for p in model.parameters() if p.requires_grad], cfg)


def _warmup(factor: Callable[[int], float], warmup: int) -> Callable[[int], float]:
    if warmup <= 0:
        return factor
    return lambda step: factor(step) * min(1.0, (step + 1) / warmup)


def _cosine(cfg: CN, steps_per_epoch: int) -> Callable[[int], float]:
    # The original anneals per step over all training steps down to 1e-6 (CosineAnnealingLR, eta_min=1e-6).
    total = max(1, steps_per_epoch * cfg.TRAIN.END_EPOCH)
    floor = min(1e-6 / cfg.TRAIN.LR, 1.0)
    return lambda step: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))


def _multistep(cfg: CN, steps_per_epoch: int) -> Callable[[int], float]:
    milestones = sorted(int(e) * steps_per_epoch for e in cfg.TRAIN.LR_STEP)
    return lambda step: cfg.TRAIN.LR_FACTOR ** sum(step >= m for m in milestones)


def _step(cfg: CN, steps_per_epoch: int) -> Callable[[int], float]:
    # A list of epochs behaves as multistep (as in the original); a single entry decays every that many epochs.
    steps = list(cfg.TRAIN.LR_STEP)
    if len(steps) != 1:
        return _multistep(cfg, steps_per_epoch)
    every = max(1, int(steps[0]) * steps_per_epoch)
    return lambda step: cfg.TRAIN.LR_FACTOR ** (step // every)


def _poly(cfg: CN, steps_per_epoch: int) -> Callable[[int], float]:
    # The segmentation schedule of the HRNet family: lr * (1 - step / total) ** 0.9.
    total = max(1, steps_per_epoch * cfg.TRAIN.END_EPOCH)
    return lambda step: max(0.0, 1 - min(step, total) / total) ** 0.9


def _none(cfg: CN, steps_per_epoch: int) -> Callable[[int], float]:
    return lambda step: 1.0


SCHEDULERS: Dict[str, Callable[[CN, int], Callable[[int], float]]] = {
    "cosine": _cosine, "step": _step, "multistep": _multistep, "poly": _poly, "none": _none,
}


def build_scheduler(cfg: CN, optimizer: torch.optim.Optimizer, steps_per_epoch: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR implementing TRAIN.LR_SCHEDULER (+ optional warm-up); call ``step()`` every step.

    Stepping every schedule per step (epoch-based ones change at epoch boundaries) makes resuming mid-epoch
    exact and keeps one code path.
    """
    name = cfg.TRAIN.LR_SCHEDULER.lower()
    if name not in SCHEDULERS:
        raise ValueError(f"TRAIN.LR_SCHEDULER: unknown scheduler {name!r}; valid names are {sorted(SCHEDULERS)}")
    factor = _warmup(SCHEDULERS[name](cfg, steps_per_epoch), cfg.TRAIN.WARMUP_STEPS)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
