"""Weight-normalised convolutions and variational dropout whose state is fixed for one forward pass.

An equilibrium solve calls f_theta tens of times per forward pass. Anything derived from the parameters (the
weight-normalised kernels) or drawn at random (dropout masks) must be the same in every call, and computing it
once instead of once per call is also cheaper. Both modules here therefore have an explicit ``refresh``/
``reset_mask`` step that the owner calls once per forward pass.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

_Pair = Union[int, Tuple[int, int]]


def _norm_except_dim0(v: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output filter: (out, in, kh, kw) -> (out, 1, 1, 1)."""
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


class WNConv2d(nn.Module):
    """A 2-d convolution with weight normalisation ``weight = weight_g * weight_v / ||weight_v||``.

    The parameters are stored as ``weight_g`` (out, 1, 1, 1) and ``weight_v`` (out, in, kh, kw), the names the
    original project's checkpoints use. ``refresh()`` computes the normalised kernel once (with autograd, so
    gradients reach g and v); every later call of ``forward`` reuses it until the next ``refresh()``. Without a
    refresh the kernel is computed on the fly, so the module also works on its own.
    """

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

    def clear(self) -> None:
        """Drops the cached kernel (and the autograd graph it holds)."""
        self._weight = None

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


class VariationalDropout2d(nn.Module):
    """Dropout with one mask per sample and channel, shared by every pixel and every call of one forward pass.

    ``reset_mask(x)`` draws a new (B, C, 1, 1) mask scaled by 1 / (1 - p); ``forward`` multiplies by it. In eval
    mode, or with p = 0, it is the identity.
    """

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
