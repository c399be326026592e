"""Anderson acceleration (type II) with a small history and Tikhonov regularisation."""
from __future__ import annotations

import math
from typing import Any, Dict, Tuple

import torch
from torch import Tensor

from .common import FixedPointMap, SolveMonitor, validate_arguments


def _mixing_weights(xs: Tensor, fs: Tensor, lam: float, newest: int) -> Tensor:
    """Weights ``alpha`` minimising ``||sum_i alpha_i g_i||^2 + reg ||alpha||^2`` with ``sum alpha = 1``.

    Solves the bordered system ``[[0, 1^T], [1, G G^T + reg I]] [mu; alpha] = [1; 0]`` per sample,
    with ``G`` the residuals ``f(x_i) - x_i`` of the history and ``reg = lam * mean_i ||g_i||^2``
    (regularisation relative to the residual scale). Samples whose system is singular or whose solution
    is not finite fall back to ``alpha = e_newest`` (a plain fixed-point step from the newest entry).

    Args:
        xs: History of iterates, shape (B, n, D).
        fs: Their map values, shape (B, n, D).
        lam: Relative Tikhonov weight (>= 0).
        newest: Index (in ``0 .. n-1``) of the newest history entry.

    Returns:
        ``alpha``, shape (B, n), summing to 1 per sample.
    """
    bsz, n, _ = xs.shape
    resid = fs - xs
    gram = torch.bmm(resid, resid.transpose(1, 2))
    scale = torch.diagonal(gram, dim1=1, dim2=2).mean(dim=1)
    eye = torch.eye(n, dtype=xs.dtype, device=xs.device)
    system = xs.new_zeros(bsz, n + 1, n + 1)
    system[:, 0, 1:] = 1
    system[:, 1:, 0] = 1
    system[:, 1:, 1:] = gram + (lam * scale)[:, None, None] * eye
    rhs = xs.new_zeros(bsz, n + 1, 1)
    rhs[:, 0] = 1
    solution, info = torch.linalg.solve_ex(system, rhs)
    alpha = solution[:, 1:, 0]
    bad = (info != 0) | ~torch.isfinite(alpha).all(dim=1)
    fallback = torch.zeros_like(alpha)
    fallback[:, newest] = 1
    return torch.where(bad[:, None], fallback, alpha)


@torch.no_grad()
def anderson(f: FixedPointMap, x0: Tensor, max_iter: int, tol: float, stop_mode: str = "abs", m: int = 5,
             beta: float = 1.0, lam: float = 1e-4, check_every: int = 1, scope: str = "sample", stall: int = 0,
             keep_start: bool = True) -> Tuple[Tensor, Dict[str, Any]]:
    """Finds ``z = f(z)`` with Anderson acceleration, per sample.

    Keeps the newest ``m`` pairs ``(x_i, f(x_i))`` and moves to
    ``x <- beta * sum_i alpha_i f(x_i) + (1 - beta) * sum_i alpha_i x_i``, where ``alpha`` (summing to
    1) minimises the regularised norm of the combined residual (see :func:`_mixing_weights`). A history
    of one entry gives a (damped) fixed-point step. Singular or non-finite small systems never raise:
    the affected sample takes a fixed-point step from its newest iterate instead.

    Args:
        f, x0, max_iter, tol, stop_mode, check_every, scope, stall, keep_start: as for every solver (see
            :mod:`mdeq.modules.solvers`).
        m: History size (at least 1).
        beta: Mixing parameter; 1 uses only the map values.
        lam: Tikhonov weight of the least-squares system, relative to the mean squared residual norm of
            the history (so it is scale free); 0 disables it.

    Returns:
        ``(z, stats)``: the best iterate of each sample, shape (B, D), and the statistics described in
        :meth:`mdeq.modules.solvers.common.SolveMonitor.result`, plus ``memory`` (int), the history size.

    Raises:
        ValueError: If ``m < 1``, ``lam < 0`` or ``beta`` is not finite (or an argument check fails).
    """
    validate_arguments(x0, max_iter, tol, stop_mode, check_every, scope, stall)
    if isinstance(m, bool) or not isinstance(m, int):
        raise TypeError(f"m must be an int, got {type(m).__name__}")
    if m < 1:
        raise ValueError(f"m must be at least 1, got {m}")
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite number of at least 0, got {lam!r}")
    if not math.isfinite(beta):
        raise ValueError(f"beta must be finite, got {beta!r}")
    bsz, dim = x0.shape
    z = x0.detach().clone()
    fz = f(z)
    monitor = SolveMonitor(z, fz, fz - z, tol, stop_mode, check_every, scope, stall, keep_start)
    xs = x0.new_zeros(bsz, m, dim)
    fs = x0.new_zeros(bsz, m, dim)
    start = monitor.active[:, None]
    xs[:, 0] = torch.where(start, z, xs[:, 0])
    fs[:, 0] = torch.where(start, fz, fs[:, 0])
    count = 1  # history entries written so far (by samples that are still active)
    if monitor.any_active():
        for step in range(1, max_iter + 1):
            n = min(count, m)
            hist_x, hist_f = xs[:, :n], fs[:, :n]
            if n == 1:
                z_new = hist_f[:, 0] if beta == 1.0 else beta * hist_f[:, 0] + (1.0 - beta) * hist_x[:, 0]
            else:
                alpha = _mixing_weights(hist_x, hist_f, lam, (count - 1) % m).unsqueeze(1)
                z_new = torch.bmm(alpha, hist_f).squeeze(1)
                if beta != 1.0:
                    z_new = beta * z_new + (1.0 - beta) * torch.bmm(alpha, hist_x).squeeze(1)
            z_new = torch.where(monitor.active[:, None], z_new, z)
            fz_new = f(z_new)
            keep = monitor.update(step, z_new, fz_new, fz_new - z_new)[:, None]
            slot = count % m
            xs[:, slot] = torch.where(keep, z_new, xs[:, slot])
            fs[:, slot] = torch.where(keep, fz_new, fs[:, slot])
            count += 1
            z = torch.where(keep, z_new, z)
            if monitor.should_stop(step):
                break
    return monitor.result(memory=m)
