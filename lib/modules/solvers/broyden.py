"""Broyden's "good" method with a batched low-rank inverse Jacobian, full or limited memory.

The root of ``g(z) = f(z) - z`` is sought with quasi-Newton steps ``z <- z - H g(z)``, where ``H``
approximates the inverse Jacobian of ``g`` as

    H = -I + U V^T,   U: (B, D, M),  V^T: (B, M, D),

so ``H`` is never formed. Each iteration adds one rank-one term (Sherman-Morrison form of Broyden's
update). With ``memory=M`` smaller than the number of iterations the approximation is built from the
newest ``M`` secant pairs only (limited-memory Broyden), so memory stays bounded by a few
``B * D * M`` buffers however many iterations run; see :func:`broyden` for the overflow policies.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from .common import FixedPointMap, SolveMonitor, validate_arguments


def _matvec(us: Tensor, vts: Tensor, x: Tensor) -> Tensor:
    """``H x`` with ``H = -I + U V^T``.

    Args:
        us: U, shape (B, D, k).
        vts: V^T, shape (B, k, D).
        x: Vectors, shape (B, D).

    Returns:
        ``H x``, shape (B, D).
    """
    if us.shape[-1] == 0:
        return -x
    return torch.bmm(us, torch.bmm(vts, x.unsqueeze(-1))).squeeze(-1) - x


def _rmatvec(us: Tensor, vts: Tensor, x: Tensor) -> Tensor:
    """``x^T H`` with ``H = -I + U V^T``.

    Args:
        us: U, shape (B, D, k).
        vts: V^T, shape (B, k, D).
        x: Vectors, shape (B, D).

    Returns:
        ``x^T H`` as rows, shape (B, D).
    """
    if us.shape[-1] == 0:
        return -x
    return torch.bmm(torch.bmm(x.unsqueeze(1), us), vts).squeeze(1) - x



def _rank_one(us: Tensor, vts: Tensor, dz: Tensor, dg: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Broyden's good update ``(u, v^T)`` for the secant pair ``(dz, dg)`` given ``H = -I + U V^T``.

    ``v^T = dz^T H`` and ``u = (dz - H dg) / (v^T dg)``. Samples outside ``mask``, or whose denominator
    is zero or whose factors are not finite, get ``u = v = 0`` (no update).

    Args:
        us: U, shape (B, D, k).
        vts: V^T, shape (B, k, D).
        dz: Step in z, shape (B, D).
        dg: Change of ``g = f(z) - z``, shape (B, D).
        mask: (B,) bool, samples to update.

    Returns:
        ``(u, vt)``, both of shape (B, D).
    """
    vt = _rmatvec(us, vts, dz)
    numer = dz - _matvec(us, vts, dg)
    denom = (vt * dg).sum(dim=1)
    valid = mask & torch.isfinite(denom) & (denom != 0)
    u = numer / torch.where(valid, denom, torch.ones_like(denom)).unsqueeze(-1)
    valid = (valid & torch.isfinite(u).all(dim=1) & torch.isfinite(vt).all(dim=1)).unsqueeze(-1)
    return torch.where(valid, u, torch.zeros_like(u)), torch.where(valid, vt, torch.zeros_like(vt))


#: What limited-memory Broyden does once ``memory`` updates are stored (see :func:`broyden`).
OVERFLOW_POLICIES: Tuple[str, ...] = ("window", "restart", "circular")


@torch.no_grad()
def broyden(f: FixedPointMap, x0: Tensor, max_iter: int, tol: float, stop_mode: str = "abs",
            memory: Optional[int] = None, check_every: int = 1,
            overflow: str = "window") -> Tuple[Tensor, Dict[str, Any]]:
    """Finds ``z = f(z)`` with Broyden's good method, per sample, full step (no line search).

    Per iteration, with ``dz = z_new - z`` and ``dg = g(z_new) - g(z)``::

        v^T = dz^T H,   u = (dz - H dg) / (v^T dg),   H <- H + u v^T,   z <- z - H g.

    An update whose denominator ``v^T dg`` is zero or non-finite is dropped (its factors are zero).
    The first step is a plain fixed-point step (``H = -I``).

    With ``memory=M`` below the number of iterations, the buffers U (B, D, M) and V^T (B, M, D) never
    grow; what happens once they are full is chosen by ``overflow``:

    * ``"window"`` (default): ``H`` is rebuilt from ``-I`` with the newest M secant pairs
      ``(dz, dg)``, kept in a circular buffer, so it is exactly Broyden's approximation from the newest M
      pairs (costs M sequential rank-one rebuild steps per iteration, and two more (B, M, D) buffers);
    * ``"restart"``: all updates are dropped and ``H`` restarts from ``-I``;
    * ``"circular"``: the newest update (computed with all M terms) overwrites the oldest term in
      place, as the original implementation did. This is the cheapest, but the remaining terms were
      computed against the dropped one, so ``H`` may stop approximating the inverse Jacobian and the
      iteration can diverge after a few cycles.

    Args:
        f: Map from a (B, D) tensor to a (B, D) tensor; row ``i`` of the output must depend only on row
            ``i`` of the input.
        x0: Starting point, shape (B, D).
        max_iter: Iteration cap (at least 1).
        tol: A sample stops once its stop-mode residual is below ``tol``.
        stop_mode: ``"abs"`` (``||f(z) - z||``) or ``"rel"`` (``||f(z) - z|| / (||f(z)|| + 1e-9)``).
        memory: Number of rank-one updates kept, M. ``None`` keeps all of them (``M = max_iter``, full
            Broyden); a smaller M bounds the memory (limited-memory Broyden).
        check_every: Test whether every sample stopped only every this many iterations (fewer host
            synchronisations on accelerators; stopped samples stay frozen meanwhile).
        overflow: ``"window"``, ``"restart"`` or ``"circular"``, see above; irrelevant when
            ``memory >= max_iter``.

    Returns:
        ``(z, stats)``: the best iterate of each sample, shape (B, D), and the statistics described in
        :meth:`mdeq.modules.solvers.common.SolveMonitor.result`, plus ``memory`` (int), the number of
        low-rank slots actually allocated (the last dimension of U).

    Raises:
        TypeError: If ``memory`` is neither an int nor None.
        ValueError: If ``memory < 1``, ``overflow`` is unknown, or an argument check fails.
    """
    validate_arguments(x0, max_iter, tol, stop_mode, check_every)
    if memory is None:
        memory = max_iter
    if isinstance(memory, bool) or not isinstance(memory, int):
        raise TypeError(f"memory must be an int or None, got {type(memory).__name__}")
    if memory < 1:
        raise ValueError(f"memory must be at least 1, got {memory}")
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {list(OVERFLOW_POLICIES)}, got {overflow!r}")
    memory = min(memory, max_iter)
    window = overflow == "window" and memory < max_iter
    bsz, dim = x0.shape
    z = x0.detach().clone()
    fz = f(z)
    g = fz - z
    monitor = SolveMonitor(z, fz, g, tol, stop_mode, check_every)
    us = x0.new_zeros(bsz, dim, memory)
    vts = x0.new_zeros(bsz, memory, dim)
    if window:
        dzs = x0.new_zeros(bsz, memory, dim)
        dgs = x0.new_zeros(bsz, memory, dim)
    step_dir = g  # -H g with H = -I
    n_updates = 0  # secant pairs seen by the samples that are still active
    if monitor.any_active():
        for step in range(1, max_iter + 1):
            z_new = torch.where(monitor.active[:, None], z + step_dir, z)
            fz_new = f(z_new)
            g_new = fz_new - z_new
            keep = monitor.update(step, z_new, fz_new, g_new)
            keep_col = keep[:, None]
            dz = z_new - z
            dg = g_new - g
            slot = n_updates % memory
            full = n_updates >= memory
            if window and full:
                dzs[:, slot] = torch.where(keep_col, dz, dzs[:, slot])
                dgs[:, slot] = torch.where(keep_col, dg, dgs[:, slot])
                # Rebuild from -I with the newest `memory` pairs, oldest first.
                new_us, new_vts = torch.zeros_like(us), torch.zeros_like(vts)
                for j in range(memory):
                    idx = (slot + 1 + j) % memory
                    u, vt = _rank_one(new_us[:, :, :j], new_vts[:, :j], dzs[:, idx], dgs[:, idx], keep)
                    new_us[:, :, j] = u
                    new_vts[:, j] = vt
                us = torch.where(keep[:, None, None], new_us, us)
                vts = torch.where(keep[:, None, None], new_vts, vts)
            else:
                if window:
                    dzs[:, slot] = torch.where(keep_col, dz, dzs[:, slot])
                    dgs[:, slot] = torch.where(keep_col, dg, dgs[:, slot])
                if full and overflow == "restart" and slot == 0:
                    us = torch.where(keep[:, None, None], torch.zeros_like(us), us)
                    vts = torch.where(keep[:, None, None], torch.zeros_like(vts), vts)
                # Terms in use: all of them once a circular buffer is full, else the first `slot`.
                filled = memory if full and overflow == "circular" else slot
                u, vt = _rank_one(us[:, :, :filled], vts[:, :filled], dz, dg, keep)
                us[:, :, slot] = torch.where(keep_col, u, us[:, :, slot])
                vts[:, slot] = torch.where(keep_col, vt, vts[:, slot])
            n_updates += 1

            z = torch.where(keep_col, z_new, z)
            g = torch.where(keep_col, g_new, g)
            filled = min(n_updates, memory) if overflow != "restart" else (n_updates - 1) % memory + 1
            step_dir = -_matvec(us[:, :, :filled], vts[:, :filled], g)
            if monitor.should_stop(step):
                break
    return monitor.result(memory=us.shape[-1])


def lbroyden(f: FixedPointMap, x0: Tensor, max_iter: int, tol: float, stop_mode: str = "abs",
             memory: int = 8, check_every: int = 1, overflow: str = "window") -> Tuple[Tensor, Dict[str, Any]]:
    """Limited-memory Broyden: :func:`broyden` with at most ``memory`` rank-one updates.

    Args:
        f: Map from a (B, D) tensor to a (B, D) tensor, row-wise independent.
        x0: Starting point, shape (B, D).
        max_iter: Iteration cap (at least 1).
        tol: A sample stops once its stop-mode residual is below ``tol``.
        stop_mode: ``"abs"`` or ``"rel"``.
        memory: Number of rank-one updates kept, M >= 1; the buffers U (B, D, M) and V^T (B, M, D) never
            grow beyond it.
        check_every: Test whether every sample stopped only every this many iterations.
        overflow: What happens once M updates are stored: ``"window"`` (newest M secant pairs),
            ``"restart"`` or ``"circular"``; see :func:`broyden`.

    Returns:
        ``(z, stats)`` as for :func:`broyden`.
    """
    return broyden(f, x0, max_iter, tol, stop_mode=stop_mode, memory=memory, check_every=check_every,
                   overflow=overflow)
