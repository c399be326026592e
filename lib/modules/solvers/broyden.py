"""Broyden's "good" method with a batched low-rank inverse Jacobian, full or limited memory.

The root of ``g(z) = f(z) - z`` is sought with quasi-Newton steps ``z <- z - H g(z)``, where ``H``
approximates the inverse Jacobian of ``g`` as

    H = -I + U^T V,   U: (B, M, D),  V: (B, M, D)  (row k of U / V is the k-th rank-one factor u_k / v_k),

so ``H`` is never formed. Each iteration adds one rank-one term (Sherman-Morrison form of Broyden's
update). With ``memory=M`` smaller than the number of iterations the approximation is built from the
newest ``M`` secant pairs only (limited-memory Broyden), so memory stays bounded by a few
``B * D * M`` buffers however many iterations run; see :func:`broyden` for the overflow policies.

Cost. The solver is memory-bound: every product with ``H`` streams stored (B, k, D) factors, while the
arithmetic is tiny. Two implementations compute the same iterates (up to rounding):

* Full memory (the default, ``memory >= max_iter``): every ``u_k``, ``v_k`` and step lies in the span of
  the residuals ``g_0 .. g_k`` seen so far, so the solver stores only the residuals G (B, max_iter + 1,
  D), their Gram matrix, and the factors as small coefficient matrices over G
  (:func:`_broyden_residual_basis`). Per iteration the D-sized work is one pass over G for the new Gram
  row, one pass that moves ``z`` by ``G^T c``, and one subtraction for ``g``; everything else is
  (B, k, k) algebra. That is half the memory of U and V and about a quarter of their traffic.
* Limited memory: U and V (B, M, D) are kept explicitly (the overflow policies act on them), and each
  update takes two passes over U and two over V (:func:`_fused_update`): the dot products of V with the
  stacked ``[g_new, dg]`` and of U with ``dz``, then the combinations; the next step follows from
  ``H_new g_new = H g_new + u (v^T g_new)`` without another pass. No (B, M, D) buffer is allocated
  inside the loop.

The factors are stored sample-major and row-contiguous, so every slice ``X[:, :k]`` is a strided batch of
contiguous matrices that the batched products read without a copy.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from .common import FixedPointMap, SolveMonitor, host_checks_are_free, validate_arguments

#: What limited-memory Broyden does once ``memory`` updates are stored (see :func:`broyden`).
OVERFLOW_POLICIES: Tuple[str, ...] = ("window", "restart", "circular")


def _apply(us: Tensor, vts: Tensor, x: Tensor) -> Tensor:
    """``H x`` for stacked vectors, with ``H = -I + U^T V``.

    Args:
        us: U, shape (B, k, D).
        vts: V, shape (B, k, D).
        x: Vectors, shape (B, m, D) (m vectors per sample).

    Returns:
        ``H x`` for every vector, shape (B, m, D).
    """
    if us.shape[1] == 0:
        return -x
    coeff = torch.bmm(x, vts.transpose(1, 2))  # (B, m, D) @ (B, D, k) -> (B, m, k): v_j . x_i
    return torch.baddbmm(x, coeff, us, beta=-1.0)  # -x + coeff @ U: (B, m, D)


def _apply_transposed(us: Tensor, vts: Tensor, x: Tensor) -> Tensor:
    """``x^T H`` (as rows) for stacked vectors, with ``H = -I + U^T V``.

    Args:
        us: U, shape (B, k, D).
        vts: V, shape (B, k, D).
        x: Vectors, shape (B, m, D).

    Returns:
        ``x^T H`` for every vector, shape (B, m, D).
    """
    if us.shape[1] == 0:
        return -x
    coeff = torch.bmm(x, us.transpose(1, 2))  # (B, m, k): u_j . x_i
    return torch.baddbmm(x, coeff, vts, beta=-1.0)  # -x + coeff @ V: (B, m, D)


def _rank_one(us: Tensor, vts: Tensor, dz: Tensor, dg: Tensor, h_dg: Optional[Tensor] = None,
              vt: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Broyden's good update ``(u, v)`` for the secant pair ``(dz, dg)`` given ``H = -I + U^T V``.

    ``v = H^T dz`` and ``u = (dz - H dg) / (v . dg)``. Samples whose denominator is zero or not finite, or
    whose factors are not finite, get ``u = v = 0`` (no update).

    Args:
        us: U, shape (B, k, D).
        vts: V, shape (B, k, D).
        dz: Step in z, shape (B, D).
        dg: Change of ``g = f(z) - z``, shape (B, D).
        h_dg: ``H dg`` when already known, shape (B, D); computed otherwise.
        vt: ``H^T dz`` when already known, shape (B, D); computed otherwise.

    Returns:
        ``(u, v, valid)``: the factors, shape (B, D) each (zero rows where the update is dropped), and the
        (B,) bool mask of samples whose update is kept.
    """
    if vt is None:
        vt = _apply_transposed(us, vts, dz.unsqueeze(1)).squeeze(1)
    if h_dg is None:
        h_dg = _apply(us, vts, dg.unsqueeze(1)).squeeze(1)
    denom = torch.linalg.vecdot(vt, dg)  # (B,)
    usable = torch.isfinite(denom) & (denom != 0)
    scale = torch.where(usable, 1.0 / torch.where(usable, denom, torch.ones_like(denom)), torch.zeros_like(denom))
    u = (dz - h_dg).mul_(scale.unsqueeze(-1))
    # A non-finite factor shows in its row sum (a sum can only add overflow, which is not finite either).
    valid = usable & torch.isfinite(u.sum(dim=1)) & torch.isfinite(vt.sum(dim=1))
    valid_col = valid.unsqueeze(-1)
    return torch.where(valid_col, u, 0.0), torch.where(valid_col, vt, 0.0), valid


def _fused_update(us: Tensor, vts: Tensor, dz: Tensor, g_new: Tensor, dg: Tensor,
                  drop_row: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """One Broyden update and the next step, with two passes over U and two over V.

    With ``H = -I + U^T V`` (k terms), computes ``H g_new``, ``H dg`` and ``v = H^T dz`` (the dot
    products of V with ``[g_new, dg]`` and of U with ``dz`` in one batched product each, then the
    combinations), the update ``(u, v)`` of :func:`_rank_one`, and the next step
    ``-H_new g_new = -(H g_new + u (v . g_new))`` without another pass.

    Args:
        us: U, shape (B, k, D).
        vts: V, shape (B, k, D).
        dz: Step in z, shape (B, D).
        g_new: ``g`` at the new iterate, shape (B, D).
        dg: Change of ``g``, shape (B, D).
        drop_row: Index of a term that the update replaces (circular buffer): the next step then uses
            ``H_new = H + u v^T - u_r v_r^T``.

    Returns:
        ``(u, v, step)``, each of shape (B, D).
    """
    k = us.shape[1]
    if k == 0:
        u, vt, _ = _rank_one(us, vts, dz, dg, h_dg=-dg, vt=-dz)
        step = g_new - u * torch.linalg.vecdot(vt, g_new).unsqueeze(-1)
        return u, vt, step
    stacked = torch.stack([g_new, dg], dim=1)  # (B, 2, D)
    coeff_v = torch.bmm(stacked, vts.transpose(1, 2))  # (B, 2, k): v_j . g_new, v_j . dg  (pass over V)
    coeff_u = torch.bmm(dz.unsqueeze(1), us.transpose(1, 2))  # (B, 1, k): u_j . dz     (pass over U)
    h_stacked = torch.baddbmm(stacked, coeff_v, us, beta=-1.0)  # (B, 2, D): H g_new, H dg (pass over U)
    vt = torch.baddbmm(dz.unsqueeze(1), coeff_u, vts, beta=-1.0).squeeze(1)  # (B, D): dz^T H (pass over V)
    h_g = h_stacked[:, 0]
    u, vt, _ = _rank_one(us, vts, dz, dg, h_dg=h_stacked[:, 1], vt=vt)
    step = torch.addcmul(h_g, u, torch.linalg.vecdot(vt, g_new).unsqueeze(-1)).neg_()
    if drop_row is not None:
        # minus the dropped term's contribution u_r (v_r . g_new)
        step.addcmul_(us[:, drop_row], coeff_v[:, 0, drop_row].unsqueeze(-1))
    return u, vt, step


def _rebuild(us: Tensor, vts: Tensor, dzs: Tensor, dgs: Tensor, oldest: int) -> None:
    """Rebuilds ``H`` from ``-I`` with the secant pairs of a full circular window, in place.

    Args:
        us: U, shape (B, M, D), overwritten.
        vts: V, shape (B, M, D), overwritten.
        dzs: Steps of the window, shape (B, M, D), circular with the oldest at ``oldest``.
        dgs: Changes of ``g``, shape (B, M, D), same order.
        oldest: Slot of the oldest pair.
    """
    memory = us.shape[1]
    for j in range(memory):
        idx = (oldest + j) % memory
        u, vt, _ = _rank_one(us[:, :j], vts[:, :j], dzs[:, idx], dgs[:, idx])
        us[:, j] = u
        vts[:, j] = vt


def _select_rows(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``where(mask[:, None], new, old)``; on the CPU, where a check is free, skips the copy if all rows are new.

    Args:
        mask: (B,) bool, rows to take from ``new``.
        new: Shape (B, D).
        old: Shape (B, D).

    Returns:
        Shape (B, D); ``new`` itself when every row is selected on the CPU.
    """
    if host_checks_are_free(new) and bool(mask.all()):
        return new
    return torch.where(mask.unsqueeze(-1), new, old)


class _ResidualStore:
    """The residuals G (B, N, D) of a solve, stored in chunks of samples, and the passes over them.

    On the CPU each chunk stays below glibc's largest mmap threshold (32 MiB), so that with
    :func:`mdeq.modules.optimizations.tune_cpu_allocator` its memory comes from, and goes back to, the heap
    instead of being faulted in afresh (and zeroed by the kernel) by every solve; a pass is then one batched
    product per chunk, writing disjoint rows of the output, so chunking adds no memory traffic. On other
    devices one chunk holds every sample.

    Args:
        like: A (B, D) tensor giving batch size, dimension, dtype and device.
        capacity: N, the most residuals ever stored.
    """

    CHUNK_BYTES = (32 << 20) - (64 << 10)

    def __init__(self, like: Tensor, capacity: int) -> None:
        bsz, dim = like.shape
        if host_checks_are_free(like):
            per_chunk = max(1, self.CHUNK_BYTES // (capacity * dim * like.element_size()))
        else:
            per_chunk = bsz
        self.bounds = [(lo, min(lo + per_chunk, bsz)) for lo in range(0, bsz, per_chunk)]
        self.chunks = [like.new_empty(hi - lo, capacity, dim) for lo, hi in self.bounds]

    def store(self, k: int, g: Tensor) -> None:
        """Writes residual k, shape (B, D)."""
        for (lo, hi), chunk in zip(self.bounds, self.chunks):
            chunk[:, k].copy_(g[lo:hi])

    def dots(self, x: Tensor, n: int) -> Tensor:
        """``g_i . x`` for residuals 0 .. n - 1: (B, D) -> (B, n)."""
        # (b, 1, D) @ (b, D, n): this orientation streams G as the BLAS's transposed operand, several times
        # faster on the CPU than G @ x.
        parts = [torch.bmm(x[lo:hi].unsqueeze(1), chunk[:, :n].transpose(1, 2)).squeeze(1)
                 for (lo, hi), chunk in zip(self.bounds, self.chunks)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def add_combination(self, base: Tensor, coeff: Tensor) -> Tensor:
        """``base + sum_i coeff_i g_i`` over residuals 0 .. n - 1 with n = coeff.shape[1]: (B, D)."""
        n = coeff.shape[1]
        if len(self.chunks) == 1:
            return torch.baddbmm(base.unsqueeze(1), coeff.unsqueeze(1), self.chunks[0][:, :n]).squeeze(1)
        out = torch.empty_like(base)
        for (lo, hi), chunk in zip(self.bounds, self.chunks):
            # (b, 1, D) + (b, 1, n) @ (b, n, D), written into rows lo .. hi - 1 of the output
            torch.baddbmm(base[lo:hi].unsqueeze(1), coeff[lo:hi].unsqueeze(1), chunk[:, :n],
                          out=out[lo:hi].unsqueeze(1))
        return out


def _broyden_residual_basis(f: FixedPointMap, z: Tensor, g: Tensor, monitor: SolveMonitor,
                            max_iter: int) -> None:
    """Full-memory Broyden iterations with every vector kept as coefficients over the residuals.

    With ``H = -I + sum_j u_j v_j^T``, the first step is ``s_0 = g_0`` and every later ``u_j``, ``v_j``
    and step ``s_k`` is a combination of ``dz``, ``dg`` and earlier factors, so all of them lie in the span
    of the residuals ``G = [g_0, .., g_k]``. Writing ``x = G^T x_c`` for any such vector and ``Gram = G
    G^T``, the update of :func:`_rank_one` becomes, in coefficients (t terms so far, n = k + 1 residuals)::

        H x_c = -x_c + Uc^T (Vc Gram x_c),   H^T y_c = -y_c + Vc^T (Uc Gram y_c),
        v = H^T dz_c,   u = (dz_c - H dg_c) / (v^T Gram dg_c),   s_k = -(H e_k + u (v^T Gram e_k)),

    with ``Uc``, ``Vc`` (t, n) and ``dg_c = e_k - e_(k-1)``. The only D-sized work per iteration is
    ``z <- z + G^T s_c`` (one pass over G), ``g_k = f(z) - z`` and the new Gram row ``G g_k`` (one more
    pass). Updates whose denominator is zero or whose factors are not finite are dropped, as in
    :func:`_rank_one`. Iterates equal those of the explicit form up to rounding.

    Args:
        f: The map, (B, D) -> (B, D), row-wise independent.
        z: Starting point, shape (B, D), already evaluated.
        g: ``f(z) - z``, shape (B, D).
        monitor: The solve's monitor, initialised at ``z``; updated in place.
        max_iter: Iteration cap.
    """
    bsz, dim = z.shape
    cap = max_iter + 1
    basis = _ResidualStore(z, cap)  # residual i: g_i (residuals >= n are never read)
    basis.store(0, g)
    gram = z.new_zeros(bsz, cap, cap)
    gram[:, 0, 0] = torch.linalg.vecdot(g, g)
    ucoef = z.new_zeros(bsz, max_iter, cap)  # row j: u_j over the residuals
    vcoef = z.new_zeros(bsz, max_iter, cap)
    step = z.new_zeros(bsz, cap)  # the next step s over the residuals (zero for stopped samples)
    step[:, 0] = monitor.active.to(z.dtype)
    active = monitor.active
    for k in range(1, max_iter + 1):
        z_new = basis.add_combination(z, step[:, :k])  # z + G^T s: (B, D)
        z_new = _select_rows(active, z_new, z)  # a stopped sample stays put even if its residuals are NaN
        fz = f(z_new)
        g_new = fz - z_new
        basis.store(k, g_new)
        active = monitor.update(k, z_new, fz, g_new)
        if k == max_iter or monitor.should_stop(k):
            break
        z = z_new
        n, terms = k + 1, k - 1
        row = basis.dots(g_new, n)  # (B, n): g_i . g_k
        gram[:, k, :n] = row
        gram[:, :n, k] = row
        gmat = gram[:, :n, :n]
        g_ek = gmat[:, :, k]  # Gram e_k: (B, n)
        g_dg = g_ek - gmat[:, :, k - 1]  # Gram dg_c: (B, n)
        dz_c = step[:, :n]
        # H applied to [dg_c, e_k] and H^T to dz_c, in coefficients.
        rhs = z.new_zeros(n, 2)
        rhs[k, 0], rhs[k - 1, 0], rhs[k, 1] = 1.0, -1.0, 1.0
        h_x = -rhs.expand(bsz, n, 2)
        v_new = -dz_c
        if terms > 0:
            uc, vc = ucoef[:, :terms, :n], vcoef[:, :terms, :n]
            a = torch.bmm(vc, torch.stack([g_dg, g_ek], dim=2))  # (B, t, 2): v_j . dg, v_j . g_k
            h_x = h_x + torch.bmm(uc.transpose(1, 2), a)  # (B, n, 2)
            b = torch.bmm(uc, torch.bmm(gmat, dz_c.unsqueeze(-1)))  # (B, t, 1): u_j . dz
            v_new = v_new + torch.bmm(vc.transpose(1, 2), b).squeeze(-1)  # (B, n)
        denom = torch.linalg.vecdot(v_new, g_dg)  # v . dg: (B,)
        usable = torch.isfinite(denom) & (denom != 0)
        u_new = (dz_c - h_x[:, :, 0]) / torch.where(usable, denom, torch.ones_like(denom)).unsqueeze(-1)
        valid = usable & torch.isfinite(u_new).all(dim=1) & torch.isfinite(v_new).all(dim=1)
        u_new = torch.where(valid.unsqueeze(-1), u_new, 0.0)
        v_new = torch.where(valid.unsqueeze(-1), v_new, 0.0)
        ucoef[:, terms, :n] = u_new
        vcoef[:, terms, :n] = v_new
        # s_k = -H_new g_k = -(H e_k + u (v . g_k))
        s_new = -(h_x[:, :, 1] + u_new * torch.linalg.vecdot(v_new, g_ek).unsqueeze(-1))
        step[:, :n] = torch.where(active.unsqueeze(-1), s_new, 0.0)


@torch.no_grad()
def broyden(f: FixedPointMap, x0: Tensor, max_iter: int, tol: float, stop_mode: str = "abs",
            memory: Optional[int] = None, check_every: int = 1, overflow: str = "window",
            scope: str = "sample", stall: int = 0, keep_start: bool = True) -> Tuple[Tensor, Dict[str, Any]]:
    """Finds ``z = f(z)`` with Broyden's good method, full step (no line search), per sample or per batch.

    Per iteration, with ``dz = z_new - z`` and ``dg = g(z_new) - g(z)``::

        v^T = dz^T H,   u = (dz - H dg) / (v^T dg),   H <- H + u v^T,   z <- z - H g.

    An update whose denominator ``v^T dg`` is zero or non-finite is dropped (its factors are zero).
    The first step is a plain fixed-point step (``H = -I``). Samples stop independently; a stopped
    sample's iterate no longer moves and its solver state is no longer used.

    With ``memory=M`` below the number of iterations, the buffers U and V (B, M, D) never grow; what
    happens once they are full is chosen by ``overflow``:

    * ``"window"`` (default): ``H`` is rebuilt from ``-I`` with the newest M secant pairs
      ``(dz, dg)``, kept in a circular buffer, so it is exactly Broyden's approximation from the newest M
      pairs (costs M sequential rank-one rebuild steps per iteration, and two more (B, M, D) buffers;
      the rebuild works in place, so the memory does not grow with the number of iterations);
    * ``"restart"``: all updates are dropped and ``H`` restarts from ``-I``;
    * ``"circular"``: the newest update (computed with all M terms) overwrites the oldest term in
      place, as the original implementation did. This is the cheapest, but the remaining terms were
      computed against the dropped one, so ``H`` may stop approximating the inverse Jacobian and the
      iteration can diverge after a few cycles.

    Args:
        f, x0, max_iter, tol, stop_mode, check_every, scope, stall, keep_start: as for every solver (see
            :mod:`mdeq.modules.solvers`).
        memory: Number of rank-one updates kept, M. ``None`` keeps all of them (``M = max_iter``, full
            Broyden); a smaller M bounds the memory (limited-memory Broyden).
        overflow: ``"window"``, ``"restart"`` or ``"circular"``, see above; irrelevant when
            ``memory >= max_iter``.

    Returns:
        ``(z, stats)``: the best iterate of each sample, shape (B, D), and the statistics described in
        :meth:`mdeq.modules.solvers.common.SolveMonitor.result`, plus ``memory`` (int), the number of
        low-rank slots actually allocated (the second dimension of U).

    Raises:
        TypeError: If ``memory`` is neither an int nor None.
        ValueError: If ``memory < 1``, ``overflow`` is unknown, or an argument check fails.
    """
    validate_arguments(x0, max_iter, tol, stop_mode, check_every, scope, stall)
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
    monitor = SolveMonitor(z, fz, g, tol, stop_mode, check_every, scope, stall, keep_start)
    if memory == max_iter:
        if monitor.any_active():
            _broyden_residual_basis(f, z, g, monitor, max_iter)
        return monitor.result(memory=memory)
    # Slots are written before they are read, so the buffers need no initialisation.
    us = x0.new_empty(bsz, memory, dim)
    vts = x0.new_empty(bsz, memory, dim)
    if window:
        dzs = x0.new_empty(bsz, memory, dim)
        dgs = x0.new_empty(bsz, memory, dim)
    step_dir = torch.where(monitor.active.unsqueeze(-1), g, 0.0)  # -H g with H = -I; zero once stopped
    terms = 0  # rank-one terms of H in use (slots 0 .. terms - 1, or all M of a full circular buffer)
    n_updates = 0  # secant pairs seen by the samples that are still active
    if monitor.any_active():
        for step in range(1, max_iter + 1):
            # A stopped sample's step is zero, so its iterate (and its g) stay where they are.
            z_new = z + step_dir
            fz_new = f(z_new)
            g_new = fz_new - z_new
            keep = monitor.update(step, z_new, fz_new, g_new)
            if step == max_iter or monitor.should_stop(step):
                break
            dz = step_dir
            dg = g_new - g
            slot = n_updates % memory
            full = n_updates >= memory
            if window and full:
                dzs[:, slot] = dz
                dgs[:, slot] = dg
                _rebuild(us, vts, dzs, dgs, (slot + 1) % memory)
                step_dir = _apply(us, vts, g_new.unsqueeze(1)).squeeze(1).neg_()
            else:
                if window:
                    dzs[:, slot] = dz
                    dgs[:, slot] = dg
                if full and overflow == "restart" and slot == 0:
                    terms = 0
                circular_full = full and overflow == "circular"
                in_use = memory if circular_full else terms
                u, vt, step_dir = _fused_update(us[:, :in_use], vts[:, :in_use], dz, g_new, dg,
                                                drop_row=slot if circular_full else None)
                us[:, slot] = u
                vts[:, slot] = vt
                terms = min(terms + 1, memory)
            n_updates += 1
            step_dir = _select_rows(keep, step_dir, torch.zeros_like(step_dir))
            z = z_new
            g = g_new
    return monitor.result(memory=us.shape[1])


def lbroyden(f: FixedPointMap, x0: Tensor, max_iter: int, tol: float, stop_mode: str = "abs",
             memory: int = 8, check_every: int = 1, overflow: str = "window", scope: str = "sample",
             stall: int = 0, keep_start: bool = True) -> Tuple[Tensor, Dict[str, Any]]:
    """Limited-memory Broyden: :func:`broyden` with at most ``memory`` rank-one updates.

    Args:
        f: Map from a (B, D) tensor to a (B, D) tensor, row-wise independent.
        x0: Starting point, shape (B, D).
        max_iter: Iteration cap (at least 1).
        tol: A sample stops once its stop-mode residual is below ``tol``.
        stop_mode: ``"abs"`` or ``"rel"``.
        memory: Number of rank-one updates kept, M >= 1; the buffers U and V (B, M, D) never grow beyond
            it.
        check_every: Test whether every sample stopped only every this many iterations.
        overflow: What happens once M updates are stored: ``"window"`` (newest M secant pairs),
            ``"restart"`` or ``"circular"``; see :func:`broyden`.

    Returns:
        ``(z, stats)`` as for :func:`broyden`.
    """
    return broyden(f, x0, max_iter, tol, stop_mode=stop_mode, memory=memory, check_every=check_every,
                   overflow=overflow, scope=scope, stall=stall, keep_start=keep_start)
