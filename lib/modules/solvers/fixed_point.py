"""Plain fixed-point (Picard) iteration ``z <- f(z)``."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor

from .common import FixedPointMap, SolveMonitor, validate_arguments


@torch.no_grad()
def fixed_point(f: FixedPointMap, x0: Tensor, max_iter: int, tol: float, stop_mode: str = "abs",
                check_every: int = 1, scope: str = "sample", stall: int = 0, keep_start: bool = True
                ) -> Tuple[Tensor, Dict[str, Any]]:
    """Finds ``z = f(z)`` by iterating ``z <- f(z)``, per sample.

    Converges when ``f`` is a contraction; slow when its Lipschitz constant is close to 1.

    Args:
        f, x0, max_iter, tol, stop_mode, check_every, scope, stall, keep_start: as for every solver (see
            :mod:`mdeq.modules.solvers`).

    Returns:
        ``(z, stats)``: the best iterate of each sample, shape (B, D), and the statistics described in
        :meth:`mdeq.modules.solvers.common.SolveMonitor.result`.
    """
    validate_arguments(x0, max_iter, tol, stop_mode, check_every, scope, stall)
    z = x0.detach().clone()
    fz = f(z)
    monitor = SolveMonitor(z, fz, fz - z, tol, stop_mode, check_every, scope, stall, keep_start)
    if monitor.any_active():
        for step in range(1, max_iter + 1):
            z_new = torch.where(monitor.active[:, None], fz, z)
            fz_new = f(z_new)
            keep = monitor.update(step, z_new, fz_new, fz_new - z_new)[:, None]
            z = torch.where(keep, z_new, z)
            fz = torch.where(keep, fz_new, fz)
            if monitor.should_stop(step):
                break
    return monitor.result()
