"""Bookkeeping shared by the fixed-point solvers.

Every solver in this package looks for ``z = f(z)`` on a batch of ``B`` independent problems of
dimension ``D``. This module holds what they have in common:

* argument checks (:func:`validate_arguments`);
* per-sample residuals (:func:`residuals`);
* :class:`SolveMonitor`, which follows each sample separately: it counts the iterations a sample ran,
  keeps its best finite iterate, decides when it stopped (converged, diverged or stalled) and freezes it,
  and assembles the ``stats`` dictionary returned by every solver.

Two stopping scopes (the solvers' ``scope`` option):

* ``"sample"`` (this project's): every sample stops on its own residual and keeps its own best iterate,
  so a sample's result does not depend on the rest of the batch.
* ``"batch"`` (both original implementations): one residual for the whole batch, the norm of the
  (B, D) residual tensor (``abs``) or that norm over the norm of ``f(z)`` (``rel``); the whole batch stops
  together and the returned iterate is the batch's iterate at the step with the lowest batch residual.

Two more options reproduce the originals: ``stall`` (the "no progress" stop of both originals: stop once
the residual is below ``3 tol`` and the last ``stall`` residuals vary by less than a factor 1.3; it can
only act after more than ``stall`` iterations) and ``keep_start`` (whether the starting point counts as a
candidate for the returned iterate and may already count as converged: True in the first original, False
in its second generation, which always takes at least one step, returns the best of the iterates it
computed and measures divergence against its first step's residual).

The monitor never synchronises with an accelerator except in :meth:`SolveMonitor.should_stop`, which
callers invoke once per iteration but which only looks at the device every ``check_every`` iterations. (On
the CPU, where a look at a value costs nothing, :meth:`SolveMonitor.update` checks whether every sample
improved and then keeps a reference to the iterate instead of copying it.)
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import Tensor

#: Signature of the map whose fixed point is sought: (B, D) -> (B, D).
FixedPointMap = Callable[[Tensor], Tensor]

#: Stopping criteria a solver understands.
STOP_MODES: Tuple[str, ...] = ("abs", "rel")

#: Stopping scopes: every sample on its own, or the whole batch on one residual (see the module docstring).
SCOPES: Tuple[str, ...] = ("sample", "batch")

#: The "no progress" stop needs the residual below this multiple of the tolerance ...
STALL_TOL_FACTOR: float = 3.0

#: ... and the largest of the last ``stall`` residuals within this factor of the smallest.
STALL_RATIO: float = 1.3

#: Added to ``||f(z)||`` in the relative residual so that ``f(z) = 0`` does not divide by zero.
REL_EPS: float = 1e-9

#: A sample whose stop-mode residual exceeds this multiple of its initial residual is marked diverged.
DIVERGENCE_FACTOR: Dict[str, float] = {"abs": 1e6, "rel": 1e3}


def host_checks_are_free(t: Tensor) -> bool:
    """Whether looking at a value of ``t`` on the host costs no synchronisation (True for CPU tensors).

    The solvers take cheaper paths where it does (skip a masked copy when every sample is selected, copy only
    the rows that changed); on accelerators they use masked operations that never synchronise. Tests patch
    this function to run the accelerator paths on the CPU.
    """
    return t.device.type == "cpu"


def validate_arguments(x0: Tensor, max_iter: int, tol: float, stop_mode: str, check_every: int,
                       scope: str = "sample", stall: int = 0) -> None:
    """Checks the arguments shared by all solvers.

    Args:
        x0: Starting point, shape (B, D), floating point.
        max_iter: Iteration cap, an int of at least 1.
        tol: Stopping tolerance, a finite float of at least 0.
        stop_mode: ``"abs"`` or ``"rel"``.
        check_every: How often (in iterations) the "all samples stopped" test runs, an int of at least 1.
        scope: ``"sample"`` or ``"batch"``.
        stall: Window of the "no progress" stop, an int of at least 0 (0: off).

    Raises:
        TypeError: If ``x0`` is not a floating-point tensor or an integer argument is not an int.
        ValueError: If a value is out of range or ``x0`` is not two-dimensional.
    """
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        raise TypeError(f"x0 must be a floating-point tensor, got {type(x0).__name__}")
    if x0.dim() != 2:
        raise ValueError(f"x0 must have shape (B, D), got shape {tuple(x0.shape)}")
    for name, value in (("max_iter", max_iter), ("check_every", check_every)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not math.isfinite(tol) or tol < 0:
        raise ValueError(f"tol must be a finite number of at least 0, got {tol!r}")
    if stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode must be one of {list(STOP_MODES)}, got {stop_mode!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    if isinstance(stall, bool) or not isinstance(stall, int):
        raise TypeError(f"stall must be an int, got {type(stall).__name__}")
    if stall < 0:
        raise ValueError(f"stall must be 0 (off) or positive, got {stall}")


def residuals(g: Tensor, fz: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-sample residuals of an iterate.

    Args:
        g: ``f(z) - z``, shape (B, D).
        fz: ``f(z)``, shape (B, D).

    Returns:
        ``(abs_res, rel_res, finite)``, each of shape (B,): ``||f(z) - z||_2``,
        ``||f(z) - z||_2 / (||f(z)||_2 + 1e-9)`` and whether both norms are finite.
    """
    abs_res = torch.linalg.vector_norm(g, dim=1)
    f_norm = torch.linalg.vector_norm(fz, dim=1)
    rel_res = abs_res / (f_norm + REL_EPS)
    finite = torch.isfinite(abs_res) & torch.isfinite(f_norm)
    return abs_res, rel_res, finite


def batch_residuals(abs_res: Tensor, f_norm: Tensor, finite: Tensor, stop_mode: str) -> Tuple[Tensor, Tensor]:
    """The batch's stop-mode residual, broadcast to every sample, and whether all of the batch is finite.

    Args:
        abs_res: Per-sample ``||f(z) - z||``, shape (B,).
        f_norm: Per-sample ``||f(z)||``, shape (B,) (used in ``rel`` mode only).
        finite: Per-sample finiteness, shape (B,) bool.
        stop_mode: ``"abs"`` or ``"rel"``.

    Returns:
        ``(res, finite)``, each of shape (B,): the norm of the whole (B, D) residual (``abs``) or that norm
        divided by the norm of the whole ``f(z)`` plus 1e-9 (``rel``), and whether every sample is finite.
    """
    total = torch.linalg.vector_norm(abs_res)  # ||f(z) - z|| over the batch
    if stop_mode == "rel":
        total = total / (torch.linalg.vector_norm(f_norm) + REL_EPS)
    return total.expand_as(abs_res), finite.all().expand_as(finite)


class SolveMonitor:
    """Progress of a solve per sample or per batch: stopping, best iterate, statistics.

    A sample is *active* until its stop-mode residual drops below ``tol`` (converged), it diverges
    (non-finite ``f``, or a residual above ``DIVERGENCE_FACTOR[stop_mode]`` times its initial residual), or
    it stalls (``stall > 0``, see the module docstring). Once stopped it stays stopped; solvers must then
    keep its iterate and internal state unchanged (use the mask returned by :meth:`update`). With
    ``scope="batch"`` the residual that decides all of this is the batch's, so every sample stops at the same
    step and the best iterate is the whole batch's at one step.

    Args:
        x0: Starting point, shape (B, D).
        fx0: ``f(x0)``, shape (B, D).
        g0: ``f(x0) - x0``, shape (B, D).
        tol: Stopping tolerance on the stop-mode residual.
        stop_mode: ``"abs"`` or ``"rel"``.
        check_every: The "all stopped" test in :meth:`should_stop` runs every this many iterations.
        scope: ``"sample"`` or ``"batch"``.
        stall: Window of the "no progress" stop (0: off).
        keep_start: Whether ``x0`` is a candidate for the returned iterate (and may count as converged).

    Attributes:
        active: (B,) bool, samples still iterating.
        nfev: Number of calls of ``f`` recorded so far (starts at 1 for ``f(x0)``).
    """

    def __init__(self, x0: Tensor, fx0: Tensor, g0: Tensor, tol: float, stop_mode: str, check_every: int,
                 scope: str = "sample", stall: int = 0, keep_start: bool = True) -> None:
        self.tol = float(tol)
        self.stop_mode = stop_mode
        self.check_every = check_every
        self.scope = scope
        self.stall = int(stall)
        self.keep_start = bool(keep_start)
        abs0, rel0, finite0 = residuals(g0, fx0)
        res0, finite0 = self._stop_residual(g0, fx0, abs0, rel0, finite0)
        self._limit = DIVERGENCE_FACTOR[stop_mode] * res0
        self.best_z = x0.clone()
        self._owns_best = True  # False while best_z is a reference to a caller's iterate (CPU only)
        inf = torch.full_like(res0, math.inf)
        self.best_res = torch.where(finite0, res0, inf) if self.keep_start else inf
        self.best_abs = abs0
        self.best_rel = rel0
        bsz = x0.shape[0]
        self.best_step = torch.zeros(bsz, dtype=torch.long, device=x0.device)
        self.nstep = torch.zeros(bsz, dtype=torch.long, device=x0.device)
        self.converged = finite0 & (res0 < self.tol) & self.keep_start
        self.diverged = ~finite0
        self.stalled = torch.zeros_like(finite0)
        self.active = ~(self.converged | self.diverged)
        self.trace: List[Tensor] = [res0.clone()]
        self.nfev = 1

    def _stop_residual(self, g: Tensor, fz: Tensor, abs_res: Tensor, rel_res: Tensor, finite: Tensor
                       ) -> Tuple[Tensor, Tensor]:
        """The residual that decides stopping, (B,), and its finiteness: per sample, or the batch's."""
        if self.scope == "sample":
            return (abs_res if self.stop_mode == "abs" else rel_res), finite
        f_norm = torch.linalg.vector_norm(fz, dim=1) if self.stop_mode == "rel" else abs_res
        return batch_residuals(abs_res, f_norm, finite, self.stop_mode)

    def any_active(self) -> bool:
        """Whether some sample is still iterating (synchronises with the device)."""
        return bool(self.active.any())

    def update(self, step: int, z: Tensor, fz: Tensor, g: Tensor) -> Tensor:
        """Records iteration ``step``, the iterate ``z`` and its map value ``fz``.

        Only samples active before this call are affected: their step count grows by one, their best
        iterate is replaced if ``z`` has a lower finite residual, and they stop if ``z`` converged or
        diverged.

        Args:
            step: 1-based iteration index.
            z: The new iterate, shape (B, D). The monitor may keep a reference to it as the best iterate,
                so callers must not modify it in place afterwards.
            fz: ``f(z)``, shape (B, D); counts as one call of ``f``.
            g: ``fz - z``, shape (B, D).

        Returns:
            (B,) bool: samples still active after this iteration. Solvers update their state only where
            this is true, so samples that just stopped keep their previous (finite) state.
        """
        self.nfev += 1
        abs_res, rel_res, finite = residuals(g, fz)
        res, finite = self._stop_residual(g, fz, abs_res, rel_res, finite)
        if step == 1 and not self.keep_start:
            # the second generation measures divergence against its first step's residual
            self._limit = DIVERGENCE_FACTOR[self.stop_mode] * torch.where(finite, res, self._limit)
        was = self.active
        self.nstep += was.long()
        ok = was & finite
        better = ok & (res < self.best_res)
        self._record_best(z, better)
        self.best_res = torch.where(better, res, self.best_res)
        self.best_abs = torch.where(better, abs_res, self.best_abs)
        self.best_rel = torch.where(better, rel_res, self.best_rel)
        self.best_step = torch.where(better, torch.full_like(self.best_step, step), self.best_step)
        conv = ok & (res < self.tol)
        div = was & ~conv & (~finite | (res > self._limit))
        self.trace.append(torch.where(was, res, self.best_res))
        stop = conv | div
        if self.stall and step > self.stall:
            window = torch.stack(self.trace[-self.stall:])  # (stall, B): the last `stall` residuals
            flat = window.amax(dim=0) < STALL_RATIO * window.amin(dim=0)
            stalled = ok & ~stop & (res < STALL_TOL_FACTOR * self.tol) & flat
            self.stalled = self.stalled | stalled
            stop = stop | stalled
        self.converged = self.converged | conv
        self.diverged = self.diverged | div
        self.active = was & ~stop
        return self.active

    def _record_best(self, z: Tensor, better: Tensor) -> None:
        """Replaces the best iterate by z in the rows marked ``better`` ((B,) bool).

        On an accelerator this is one masked copy (no synchronisation). On the CPU, where looking at the mask
        costs nothing, the common cases are cheaper: when every row improved the monitor keeps a reference to
        z (the caller must not modify it in place), and otherwise it copies only the improved rows into a
        tensor of its own.
        """
        if not host_checks_are_free(z):
            self.best_z = torch.where(better[:, None], z, self.best_z)
            return
        if bool(better.all()):
            self.best_z = z
            self._owns_best = False
            return
        rows = better.nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        if not self._owns_best:
            self.best_z = self.best_z.clone()
            self._owns_best = True
        self.best_z.index_copy_(0, rows, z.index_select(0, rows))

    def should_stop(self, step: int) -> bool:
        """Whether the loop may end after iteration ``step``.

        Looks at the device (one host synchronisation) only when ``step`` is a multiple of
        ``check_every``; otherwise returns False without synchronising. Stopped samples are frozen, so
        running extra iterations never changes the result.
        """
        if step % self.check_every:
            return False
        return not self.any_active()

    def result(self, **extra: Any) -> Tuple[Tensor, Dict[str, Any]]:
        """The best iterate of every sample and the solve statistics.

        Args:
            **extra: Additional solver-specific entries for the stats dictionary.

        Returns:
            ``(z, stats)`` with ``z`` of shape (B, D) and ``stats`` holding ``nstep`` (B,) long,
            ``best_step`` (B,) long, ``abs_res`` (B,), ``rel_res`` (B,), ``diverged`` (B,) bool,
            ``converged`` (B,) bool, ``stalled`` (B,) bool, ``nfev`` int and ``trace``, a list of (B,)
            tensors: the stop-mode residual at iteration 0, 1, ... (a stopped sample repeats its best
            residual; with ``scope="batch"`` every entry is the batch's residual).
        """
        stats: Dict[str, Any] = {
            "nstep": self.nstep,
            "best_step": self.best_step,
            "abs_res": self.best_abs,
            "rel_res": self.best_rel,
            "diverged": self.diverged,
            "converged": self.converged,
            "stalled": self.stalled,
            "nfev": self.nfev,
            "trace": self.trace,
        }
        stats.update(extra)
        return self.best_z, stats
