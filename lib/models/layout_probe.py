"""Memory format of an MDEQ: contiguous (NCHW) or channels_last (NHWC), fixed or chosen by a short probe.

``MODEL.CHANNELS_LAST`` takes ``true``, ``false`` or ``auto``. With ``auto``, :func:`choose_channels_last` times a
few calls of f_theta (without autograd) on a small batch of the model's input shape in both memory formats on
the run's device and keeps channels_last only where it is faster by more than a margin (3 % by default). The
two timings and the choice are logged. Neither format changes what the model computes (up to rounding).
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from yacs.config import CfgNode as CN

from mdeq.config.loader import tristate
from mdeq.utils import distributed as du

logger = logging.getLogger(__name__)

# A timer runs one call and returns its duration in seconds; it gets the call and the device.
Timer = Callable[[Callable[[], Any], torch.device], float]

PROBE_MAX_BATCH = 16  # images per probe batch at most
PROBE_MAX_PIXELS = 1 << 20  # and at most this many input pixels in the batch (large segmentation crops)


def apply_channels_last(model: nn.Module, enabled: bool) -> nn.Module:
    """Puts an MDEQ into channels_last (``enabled``) or contiguous memory format and returns it.

    Converts every 4-d parameter and buffer and sets ``model.channels_last``, with which the network creates
    its equilibrium states in the same format (see :class:`mdeq.models.mdeq_core.MDEQNet`).
    """
    fmt = torch.channels_last if enabled else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if hasattr(model, "channels_last"):
        model.channels_last = bool(enabled)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_timer(run: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``run`` on ``device`` (synchronised before and after on CUDA)."""
    _sync(device)
    start = time.perf_counter()
    run()
    _sync(device)
    return time.perf_counter() - start


def _f_call(model: nn.Module, sample: torch.Tensor) -> Callable[[], List[torch.Tensor]]:
    """A call of f_theta at a realistic state: the injection of ``sample`` and one application of f from zero.

    Returns a function that applies f_theta once more (without autograd) and returns its output.
    """
    xs = model.injection(sample)
    model.fullstage.prepare([e.shape for e in xs], xs[0].device, xs[0].dtype)
    injection: List[Optional[torch.Tensor]] = [xs[0]] + [None] * (len(xs) - 1)
    z = model.fullstage([torch.zeros_like(e) for e in xs], injection)  # also the warm-up call

    def run() -> List[torch.Tensor]:
        return model.fullstage(z, injection)

    return run


def choose_channels_last(model: nn.Module, sample_input: torch.Tensor, device: torch.device | str,
                         repeats: int = 3, margin: float = 0.03, timer: Optional[Timer] = None,
                         min_seconds: float = 0.05, max_rounds: int = 50) -> Tuple[bool, Dict[str, float]]:
    """Times f_theta in both memory formats and says whether channels_last is the faster.

    The model itself is not changed: the probe runs on two copies, in evaluation mode, without autograd, with
    the random generators restored afterwards. Calls alternate between the formats (one warm-up call each, then
    at least ``repeats`` timed calls each, more while a format's timed calls add up to less than
    ``min_seconds``, at most ``max_rounds``) and each format keeps its fastest call, so that a burst of load on
    a shared machine does not decide.

    Args:
        model: An MDEQ (:class:`mdeq.models.mdeq_core.MDEQNet`), not yet compiled.
        sample_input: Images (B, C, H, W) of the run's input shape; the values do not matter.
        device: Where the run trains.
        repeats: Timed calls per format.
        margin: channels_last is chosen only when its time is below ``(1 - margin)`` times the contiguous one.
        timer: Measures one call (see :data:`Timer`); the default is :func:`wall_timer`.
        min_seconds: Keep timing (beyond ``repeats``) until each format has run this long: very fast calls
            (a small model, a GPU) get more samples.
        max_rounds: The most timed calls per format.

    Returns:
        (use channels_last, {"contiguous": seconds, "channels_last": seconds}) with the fastest call of f_theta
        in each format.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    device = torch.device(device)
    timer = timer or wall_timer
    rng_devices = [device] if device.type == "cuda" else []
    best = {"contiguous": float("inf"), "channels_last": float("inf")}
    total = {"contiguous": 0.0, "channels_last": 0.0}
    with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
        calls = {}
        for name in best:
            probe = apply_channels_last(copy.deepcopy(model).to(device).eval(), name == "channels_last")
            calls[name] = _f_call(probe, sample_input.to(device))
        rounds = 0
        while rounds < repeats or (min(total.values()) < min_seconds and rounds < max(max_rounds, repeats)):
            rounds += 1
            for name, run in calls.items():
                seconds = float(timer(run, device))
                best[name] = min(best[name], seconds)
                total[name] += seconds
    use = best["channels_last"] < (1.0 - margin) * best["contiguous"]
    return use, best


def _probe_device(cfg: CN) -> torch.device:
    """The device the run will use (the runner has already made its GPU the current one)."""
    name = str(cfg.DEVICE).lower()
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def probe_input(cfg: CN, model: nn.Module) -> torch.Tensor:
    """Random images of the run's input shape: MODEL.IMAGE_SIZE for classification, the TRAIN.IMAGE_SIZE crop
    for segmentation; the batch is the training batch capped at 16 images and 2**20 pixels."""
    from mdeq.models.mdeq import MDEQSegNet  # (imported here: that module calls this one)

    width, height = (cfg.TRAIN.IMAGE_SIZE if isinstance(model, MDEQSegNet) else cfg.MODEL.IMAGE_SIZE)
    channels = model.downsample[0].in_channels
    batch = max(1, min(int(cfg.TRAIN.BATCH_SIZE_PER_GPU), PROBE_MAX_BATCH, PROBE_MAX_PIXELS // (width * height)))
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, channels, height, width, generator=generator)


def apply_layout_setting(cfg: CN, model: nn.Module, timer: Optional[Timer] = None) -> nn.Module:
    """Applies MODEL.CHANNELS_LAST (true / false / auto) to a freshly built MDEQ and returns it.

    With ``auto`` the probe of :func:`choose_channels_last` runs on the run's device (rank 0 decides for every
    process, so that all ranks train in the same format) and its timings and choice are logged.
    """
    setting = tristate("MODEL.CHANNELS_LAST", cfg.MODEL.CHANNELS_LAST)
    if setting == "false":  # the built model is already contiguous: leave its tensors as they are
        model.channels_last = False
        return model
    if setting == "true":
        return apply_channels_last(model, True)
    device = _probe_device(cfg)
    sample = probe_input(cfg, model)
    use, timings = choose_channels_last(model, sample, device, timer=timer)
    use = bool(du.broadcast_object(use))
    logger.info("MODEL.CHANNELS_LAST auto: one call of f_theta on %s (input %s) takes %.2f ms contiguous, "
                "%.2f ms channels_last -> %s", device, tuple(sample.shape), 1e3 * timings["contiguous"],
                1e3 * timings["channels_last"], "channels_last" if use else "contiguous")
    return apply_channels_last(model, use)

