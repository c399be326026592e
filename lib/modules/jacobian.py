"""Jacobian utilities for equilibrium layers: Frobenius-norm regulariser and spectral-radius probe.

Both work from ``f0 = f(z0)`` computed with ``z0`` requiring grad, and only use vector-Jacobian
products ``v^T J`` (``J = df0/dz0`` per sample), so the Jacobian is never formed.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def _random_like(t: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """Standard normal noise with the shape, dtype and device of ``t``."""
    return torch.randn(t.shape, dtype=t.dtype, device=t.device, generator=generator)


def jac_loss_estimate(f0: Tensor, z0: Tensor, vecs: int = 1, create_graph: bool = True, *,
                      generator: Optional[torch.Generator] = None) -> Tensor:
    """Hutchinson estimate of the normalised squared Frobenius norm of the Jacobian.

    Estimates ``mean_b ||J_b||_F^2 / D`` with ``J_b = d f0[b] / d z0[b]`` and ``D`` the number of
    elements of one sample, via ``E_v ||v^T J_b||^2 = ||J_b||_F^2`` for ``v ~ N(0, I)``, averaged over
    ``vecs`` draws. With ``create_graph=True`` the result is differentiable, so its gradient reaches the
    parameters of ``f`` (the Jacobian regulariser of deep equilibrium training).

    Args:
        f0: ``f(z0)``, shape (B, ...), computed from ``z0`` with autograd enabled.
        z0: The input, shape (B, ...), with ``requires_grad=True``.
        vecs: Number of random probe vectors (at least 1).
        create_graph: Build a graph of the estimate for a backward pass through it.
        generator: Optional random generator for the probe vectors.

    Returns:
        Scalar tensor: the estimate averaged over the batch.

    Raises:
        ValueError: If ``vecs < 1``.
    """
    if vecs < 1:
        raise ValueError(f"vecs must be at least 1, got {vecs}")
    total = f0.new_zeros(())
    for _ in range(vecs):
        v = _random_like(f0, generator)
        (vjp,) = torch.autograd.grad(f0, z0, v, retain_graph=True, create_graph=create_graph)
        total = total + vjp.pow(2).sum()
    return total / (vecs * z0.numel())


def power_method(f0: Tensor, z0: Tensor, n_iters: int = 100, *,
                 generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Estimates the spectral radius of ``J = df0/dz0`` per sample by power iteration on ``J^T``.

    Iterates ``v <- J^T v / ||J^T v||`` with vector-Jacobian products (``J^T`` has the spectrum of
    ``J``) and reports the absolute Rayleigh quotient ``|v^T J^T v| / v^T v``. Converges when one real
    eigenvalue dominates in modulus. For analysis only: nothing is differentiable, and the graph of
    ``f0`` is kept.

    Args:
        f0: ``f(z0)``, shape (B, ...), same shape as ``z0``.
        z0: The input, shape (B, ...), with ``requires_grad=True``.
        n_iters: Number of power iterations (at least 1).
        generator: Optional random generator for the starting vector.

    Returns:
        ``(radius, eigvec)``: the estimate of the largest eigenvalue modulus, shape (B,), and the unit
        (per sample) dominant eigenvector of ``J^T``, shape like ``z0``.

    Raises:
        ValueError: If ``n_iters < 1`` or the shapes of ``f0`` and ``z0`` differ.
    """
    if n_iters < 1:
        raise ValueError(f"n_iters must be at least 1, got {n_iters}")
    if f0.shape != z0.shape:
        raise ValueError(f"f0 and z0 must have the same shape, got {tuple(f0.shape)} and {tuple(z0.shape)}")
    bsz = z0.shape[0]
    vec = _random_like(z0, generator).reshape(bsz, -1)
    vec = vec / torch.linalg.vector_norm(vec, dim=1, keepdim=True)
    radius = vec.new_zeros(bsz)
    for _ in range(n_iters):
        (vjp,) = torch.autograd.grad(f0, z0, vec.reshape_as(f0), retain_graph=True, create_graph=False)
        vjp = vjp.detach().reshape(bsz, -1)
        radius = (vjp * vec).sum(dim=1).abs()
        norm = torch.linalg.vector_norm(vjp, dim=1, keepdim=True)
        vec = torch.where(norm > 0, vjp / norm.clamp_min(torch.finfo(norm.dtype).tiny), vec)
    logger.debug("power_method: %d iterations on a batch of %d", n_iters, bsz)
    return radius, vec.reshape_as(z0)
