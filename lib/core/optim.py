"""Optimizers and learning-rate schedulers by name, with the original project's semantics."""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Optional

import torch
from yacs.config import CfgNode as CN

from mdeq.config import ConfigError


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


def original_epoch_iters(num_samples: int, global_batch: int) -> int:
    """The original segmentation trainer's count of iterations per epoch, ``int(N / global batch)``.

    The original computed it from the dataset size and ``BATCH_SIZE_PER_GPU x len(GPUS)`` while each process's
    loader could run one step more (its distributed sampler pads the dataset up to a multiple of the number of
    processes): Cityscapes with 2975 images and 3 x 4 images a step counts 247 iterations an epoch but runs 248.

    Args:
        num_samples: training images N.
        global_batch: images per optimizer step over all processes.
    """
    return max(1, int(num_samples / max(1, global_batch)))


def poly_factor(step: int, steps_per_epoch: int, epoch_iters: int, end_epoch: int, power: float = 0.9) -> float:
    """The rate multiplier that the original segmentation training used at optimizer step ``step`` (0-based).

    The original stepped a cosine scheduler and then always overwrote the rate, after each optimizer step, with
    ``base * (1 - it / max_it) ** power`` where ``it = epoch * epoch_iters + i`` (``i`` the batch index in the
    epoch) and ``max_it = end_epoch * epoch_iters``. So the cosine never acted, the first step used the base rate,
    and step ``k > 0`` uses the poly value of the step before it. ``epoch_iters`` may be one less than the real
    number of steps an epoch (see :func:`original_epoch_iters`); ``it`` then repeats at epoch boundaries exactly
    as in the original. Past the end the factor stays 0.

    Args:
        step: optimizer steps already taken.
        steps_per_epoch: steps each epoch really runs (the loader length).
        epoch_iters: the original's iterations per epoch used in ``it`` and ``max_it``.
        end_epoch: TRAIN.END_EPOCH of the phase.
        power: the poly exponent (0.9 in the original).
    """
    if step <= 0:
        return 1.0
    prev = step - 1
    it = (prev // steps_per_epoch) * epoch_iters + prev % steps_per_epoch
    max_it = max(1, end_epoch * epoch_iters)
    return max(0.0, 1.0 - it / max_it) ** power


def _poly(cfg: CN, steps_per_epoch: int, epoch_iters: Optional[int] = None) -> Callable[[int], float]:
    # The original segmentation schedule (HRNet family) as its training loop really applied it; see poly_factor.
    spe = max(1, steps_per_epoch)
    iters = spe if epoch_iters is None else max(1, int(epoch_iters))
    return lambda step: poly_factor(step, spe, iters, cfg.TRAIN.END_EPOCH)


def _none(cfg: CN, steps_per_epoch: int) -> Callable[[int], float]:
    return lambda step: 1.0


SCHEDULERS: Dict[str, Callable[[CN, int], Callable[[int], float]]] = {
    "cosine": _cosine, "step": _step, "multistep": _multistep, "poly": _poly, "none": _none,
}


def build_scheduler(cfg: CN, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    epoch_iters: Optional[int] = None) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR implementing TRAIN.LR_SCHEDULER (+ optional warm-up); call ``step()`` every step.

    Stepping every schedule per step (epoch-based ones change at epoch boundaries) makes resuming mid-epoch
    exact and keeps one code path.

    Args:
        cfg: reads TRAIN.LR_SCHEDULER, LR, END_EPOCH, LR_STEP, LR_FACTOR, WARMUP_STEPS.
        optimizer: the optimizer whose rate is scheduled.
        steps_per_epoch: optimizer steps each epoch runs.
        epoch_iters: ``poly`` only: the original's iterations per epoch (:func:`original_epoch_iters`); None
            takes ``steps_per_epoch``.
    """
    name = cfg.TRAIN.LR_SCHEDULER.lower()
    if name not in SCHEDULERS:
        raise ValueError(f"TRAIN.LR_SCHEDULER: unknown scheduler {name!r}; valid names are {sorted(SCHEDULERS)}")
    if name == "poly":
        factor = _poly(cfg, steps_per_epoch, epoch_iters)
    else:
        factor = SCHEDULERS[name](cfg, steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup(factor, cfg.TRAIN.WARMUP_STEPS))


def check_names(cfg: CN) -> None:
    """Checks TRAIN.OPTIMIZER and TRAIN.LR_SCHEDULER against the registries, before anything runs.

    Raises:
        ConfigError: a name that no registry holds; the message lists the valid ones.
    """
    for key, registry in (("OPTIMIZER", OPTIMIZERS), ("LR_SCHEDULER", SCHEDULERS)):
        value = str(cfg.TRAIN[key])
        if value.lower() not in registry:
            raise ConfigError(f"config key TRAIN.{key}: unknown name {value!r}; valid names are "
                              f"{', '.join(sorted(registry))}")
