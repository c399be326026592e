"""Weight-normalised convolutions and variational dropout whose state is fixed for one forward pass, and the
CPU allocator setting that keeps repeated calls of f_theta from paying page faults.

An equilibrium solve calls f_theta tens of times per forward pass. Anything derived from the parameters (the
weight-normalised kernels) or drawn at random (dropout masks) must be the same in every call, and computing it
once instead of once per call is also cheaper. Both modules here therefore have an explicit ``refresh``/
``reset_mask`` step that the owner calls once per forward pass.
"""
from __future__ import annotations

import ctypes
import logging
import math
import os
import sys
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

_Pair = Union[int, Tuple[int, int]]

logger = logging.getLogger(__name__)

#: Environment variables that show an explicit allocator choice, which :func:`tune_cpu_allocator` respects.
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                 "MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "LD_PRELOAD")

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers of glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def tune_cpu_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Lets glibc's malloc keep freed tensor memory for reuse instead of returning it to the system.

    By default glibc serves every allocation above a (dynamic) threshold with its own ``mmap`` and unmaps it on
    free, so each call of f_theta on the CPU faults in fresh, zeroed pages for its activations (tens of MB
    per call for CIFAR-sized models): a large share of the time of a VJP. Raising the mmap threshold to its
    maximum (32 MiB on 64-bit systems) and the trim threshold to 1 GiB makes such blocks come from, and go
    back to, the heap. What is computed does not change; the process keeps up to ``trim_threshold`` bytes of
    freed memory. Only glibc on Linux is affected, and nothing is changed when the environment already
    chooses allocator settings (any of :data:`ALLOCATOR_ENV`) or ``MDEQ_CPU_ALLOCATOR=default`` is set.

    Args:
        mmap_threshold: ``M_MMAP_THRESHOLD`` in bytes (at most 32 MiB on 64-bit glibc).
        trim_threshold: ``M_TRIM_THRESHOLD`` in bytes.

    Returns:
        Whether the settings were applied.
    """
    if not sys.platform.startswith("linux") or os.environ.get("MDEQ_CPU_ALLOCATOR", "") == "default":
        return False
    if any(name in os.environ for name in ALLOCATOR_ENV):
        logger.debug("allocator settings come from the environment; leaving malloc as it is")
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # only glibc has it  # noqa: B018
    except (OSError, AttributeError):
        return False
    applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    if applied:
        logger.info("CPU allocator: glibc keeps freed blocks up to %d MiB for reuse (trim threshold %d MiB); "
                    "set MDEQ_CPU_ALLOCATOR=default to leave malloc alone", mmap_threshold >> 20,
                    trim_threshold >> 20)
    return applied


def _norm_except_dim0(v: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output filter: (out, in, kh, kw) -> (out, 1, 1, 1)."""
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


class PerForward:
    """Mixin of a module whose attributes named in ``PER_FORWARD`` belong to one forward pass (a cached kernel, a
    dropout mask): copies and pickles leave them out, ``clear_per_forward`` drops them, and CUDA graphs treat them
    as per-batch inputs (``mdeq.modules.graphs.module_slots``)."""

    PER_FORWARD: Tuple[str, ...] = ()

    def __getstate__(self) -> Dict[str, Any]:
        """The module's attributes for ``copy.deepcopy`` and pickle, without its per-forward ones."""
        state = self.__dict__.copy()
        for name in self.PER_FORWARD:
            state[name] = None
        return state


def clear_per_forward(module: nn.Module) -> None:
    """Drops the per-forward attributes of every :class:`PerForward` module in ``module``'s tree."""
    for m in module.modules():
        for name in getattr(type(m), "PER_FORWARD", ()):
            setattr(m, name, None)


class WNConv2d(PerForward, nn.Module):
    """A 2-d convolution with weight normalisation ``weight = weight_g * weight_v / ||weight_v||``.

    The parameters are stored as ``weight_g`` (out, 1, 1, 1) and ``weight_v`` (out, in, kh, kw), the names the
    original project's checkpoints use. ``refresh()`` computes the normalised kernel once (with autograd, so
    gradients reach g and v); every later call of ``forward`` reuses it until the next ``refresh()``. Without a
    refresh the kernel is computed on the fly, so the module also works on its own.

    The cached kernel is a non-leaf tensor that carries the autograd graph of the last forward pass, which
    ``copy.deepcopy`` refuses to copy. Copies and pickles (``copy.deepcopy(model)`` for an EMA or SWA model,
    ``torch.save(model)``) therefore leave the cache out: a copy computes its kernel afresh, from its own g and v.
    """

    PER_FORWARD = ("_weight",)  # the cached kernel belongs to one forward pass

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _Pair, stride: _Pair = 1,
                 padding: _Pair = 0, bias: bool = False) -> None:
        super().__init__()
        ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = ks, stride, padding
        weight = torch.empty(out_channels, in_channels, *ks)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # the default Conv2d initialisation
        self.weight_g = nn.Parameter(_norm_except_dim0(weight))
        self.weight_v = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self._weight: Optional[torch.Tensor] = None

    def compute_weight(self) -> torch.Tensor:
        """The normalised kernel (out, in, kh, kw)."""
        return self.weight_v * (self.weight_g / _norm_except_dim0(self.weight_v))

    def refresh(self) -> None:
        """Recomputes the cached kernel from the current g and v (call once per forward pass)."""
        self._weight = self.compute_weight()

    @property
    def weight(self) -> torch.Tensor:
        return self._weight if self._weight is not None else self.compute_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}")


def make_conv(in_channels: int, out_channels: int, kernel_size: int, wnorm: bool, stride: int = 1,
              bias: bool = False) -> nn.Module:
    """A 'same'-padded convolution, weight-normalised when ``wnorm``."""
    padding = kernel_size // 2
    if wnorm:
        return WNConv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)


class VariationalDropout2d(PerForward, nn.Module):
    """Dropout with one mask per sample and channel, shared by every pixel and every call of one forward pass.

    ``reset_mask(x)`` draws a new (B, C, 1, 1) mask scaled by 1 / (1 - p); ``forward`` multiplies by it. In eval
    mode, or with p = 0, it is the identity. Like the cached kernel of :class:`WNConv2d`, the mask belongs to one
    forward pass and is left out of copies and pickles.
    """

    PER_FORWARD = ("mask",)  # the mask belongs to one forward pass

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = float(dropout)
        self.mask: Optional[torch.Tensor] = None

    def reset_mask(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> None:
        """Draws the mask for a state of shape (B, C, H, W)."""
        if not self.training or self.dropout == 0.0:
            self.mask = None
            return
        keep = 1.0 - self.dropout
        self.mask = torch.empty(shape[0], shape[1], 1, 1, device=device, dtype=dtype).bernoulli_(keep) / keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout == 0.0:
            return x
        if self.mask is None:
            raise RuntimeError("VariationalDropout2d: call reset_mask() before the forward pass")
        return x * self.mask

    def extra_repr(self) -> str:
        return f"p={self.dropout}"
