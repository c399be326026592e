"""Bookkeeping shared by the fixed-point solvers.

Every solver in this package looks for ``z = f(z)`` on a batch of ``B`` independent problems of
dimension ``D``. This module holds what they have in common:

* argument checks (:func:`validate_arguments`);
* per-sample residuals (:func:`residuals`);
* :class:`SolveMonitor`, which follows each sample separately: it counts the iterations a sample ran,
  keeps its best finite iterate, decides when it stopped (converged or diverged) and freezes it, and
  assembles the ``stats`` dictionary returned by every solver.

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


def validate_arguments(x0: Tensor, max_iter: int, tol: float, stop_mode: str, check_every: int) -> None:
    """Checks the arguments shared by all solvers.

    Args:
        x0: Starting point, shape (B, D), floating point.
        max_iter: Iteration cap, an int of at least 1.
        tol: Stopping tolerance, a finite float of at least 0.
        stop_mode: ``"abs"`` or ``"rel"``.
        check_every: How often (in iterations) the "all samples stopped" test runs, an int of at least 1.

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


class SolveMonitor:
    """Per-sample progress of a solve: stopping, best iterate, statistics.

    A sample is *active* until its stop-mode residual drops below ``tol`` (converged) or it diverges
    (non-finite ``f``, or a residual above ``DIVERGENCE_FACTOR[stop_mode]`` times its initial residual).
    Once stopped it stays stopped; solvers must then keep its iterate and internal state unchanged
    (use the mask returned by :meth:`update`).

    Args:
        x0: Starting point, shape (B, D).
        fx0: ``f(x0)``, shape (B, D).
        g0: ``f(x0) - x0``, shape (B, D).
        tol: Stopping tolerance on the stop-mode residual.
        stop_mode: ``"abs"`` or ``"rel"``.
        check_every: The "all stopped" test in :meth:`should_stop` runs every this many iterations.

    Attributes:
        active: (B,) bool, samples still iterating.
        nfev: Number of calls of ``f`` recorded so far (starts at 1 for ``f(x0)``).
    """

    def __init__(self, x0: Tensor, fx0: Tensor, g0: Tensor, tol: float, stop_mode: str, check_every: int) -> None:
        self.tol = float(tol)
        self.stop_mode = stop_mode
        self.check_every = check_every
        abs0, rel0, finite0 = residuals(g0, fx0)
        res0 = abs0 if stop_mode == "abs" else rel0
        self._limit = DIVERGENCE_FACTOR[stop_mode] * res0
        self.best_z = x0.clone()
        self._owns_best = True  # False while best_z is a reference to a caller's iterate (CPU only)
        self.best_res = torch.where(finite0, res0, torch.full_like(res0, math.inf))
        self.best_abs = abs0
        self.best_rel = rel0
        bsz = x0.shape[0]
        self.best_step = torch.zeros(bsz, dtype=torch.long, device=x0.device)
        self.nstep = torch.zeros(bsz, dtype=torch.long, device=x0.device)
        self.converged = finite0 & (res0 < self.tol)
        self.diverged = ~finite0
        self.active = ~(self.converged | self.diverged)
        self.trace: List[Tensor] = [res0.clone()]
        self.nfev = 1

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
        res = abs_res if self.stop_mode == "abs" else rel_res
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
        self.converged = self.converged | conv
        self.diverged = self.diverged | div
        self.active = was & ~(conv | div)
        self.trace.append(torch.where(was, res, self.best_res))
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
            ``converged`` (B,) bool, ``nfev`` int and ``trace``, a list of (B,) tensors: the stop-mode
            residual at iteration 0, 1, ... (a stopped sample repeats its best residual).
        """
        stats: Dict[str, Any] = {
            "nstep": self.nstep,
            "best_step": self.best_step,
            "abs_res": self.best_abs,
            "rel_res": self.best_rel,
            "diverged": self.diverged,
            "converged": self.converged,
            "nfev": self.nfev,
            "trace": self.trace,
        }
        stats.update(extra)
        return self.best_z, stats
