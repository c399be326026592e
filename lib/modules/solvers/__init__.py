"""Fixed-point solvers for deep equilibrium layers, by name.

Every solver has the signature ``solver(f, x0, max_iter, tol, stop_mode="abs", **own_options)`` and
returns ``(z, stats)``; see :mod:`mdeq.modules.solvers.common` for the stopping semantics (per sample, or
over the whole batch as the original implementations: option ``scope``) and the statistics. Unknown options
raise ``TypeError``.

The arguments every solver takes:

* ``f``: map from a (B, D) tensor to a (B, D) tensor; row ``i`` of the output must depend only on row ``i``
  of the input.
* ``x0``: starting point, shape (B, D); ``max_iter``: iteration cap (at least 1).
* ``tol``: a sample (or the batch, with scope ``batch``) stops once its stop-mode residual is below ``tol``;
  ``stop_mode``: ``"abs"`` (``||f(z) - z||``) or ``"rel"`` (``||f(z) - z|| / (||f(z)|| + 1e-9)``).
* ``check_every``: test whether every sample stopped only every this many iterations (fewer host
  synchronisations on accelerators; stopped samples stay frozen meanwhile).
* ``scope``: ``"sample"`` (each sample stops on its own) or ``"batch"`` (one residual for the batch, as the
  originals); ``stall``: window of the originals' "no progress" stop (0: off); ``keep_start``: whether ``x0``
  counts as a candidate for the result (False: the second generation's).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

from torch import Tensor

from .anderson import anderson
from .broyden import broyden, lbroyden
from .fixed_point import fixed_point

#: A solver: ``(f, x0, max_iter, tol, stop_mode="abs", **own_options) -> (z, stats)``.
Solver = Callable[..., Tuple[Tensor, Dict[str, Any]]]

#: Every solver by the name used in configurations (``DEQ.F_SOLVER`` / ``DEQ.B_SOLVER``).
SOLVERS: Dict[str, Solver] = {
    "broyden": broyden,
    "lbroyden": lbroyden,
    "anderson": anderson,
    "fixed_point": fixed_point,
}


class UnknownSolverError(KeyError, ValueError):
    """Raised by :func:`get_solver` for a name not in :data:`SOLVERS` (both a KeyError and a ValueError)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def get_solver(name: str) -> Solver:
    """The solver registered under ``name`` (case-insensitive).

    Args:
        name: One of the keys of :data:`SOLVERS`.

    Returns:
        The solver function.

    Raises:
        UnknownSolverError: A ``KeyError`` and ``ValueError`` listing the valid names, if ``name`` is
            unknown.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in SOLVERS:
        raise UnknownSolverError(f"unknown solver {name!r}; valid names are {sorted(SOLVERS)}")
    return SOLVERS[key]


__all__ = ["SOLVERS", "Solver", "UnknownSolverError", "get_solver", "anderson", "broyden", "lbroyden",
           "fixed_point"]
