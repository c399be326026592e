"""The equilibrium layer: forward solve without autograd, implicit (or phantom) backward.

The per-resolution states are flattened to one (B, D) tensor per batch only at the solver boundary.

Implicit differentiation: with z* = f(z*), the gradient of a loss through z* is g^T df/dtheta where g solves the
adjoint system g = J^T g + dL/dz* (J = df/dz at z*). In training the layer makes one differentiable call
f_z = f(z*) and registers a hook on f_z that replaces the incoming gradient dL/dz* by g (solved with the backward
solver); autograd then carries g into the parameters. The hook removes itself when it fires, and a hook that never
fired (no backward) is removed at the next forward, so no hook outlives its graph.
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from mdeq.modules.jacobian import jac_loss_estimate, power_method
from mdeq.modules.solvers import get_solver

StateList = List[torch.Tensor]


def list2vec(z: Sequence[torch.Tensor]) -> torch.Tensor:
    """[(B, C_i, H_i, W_i)] -> (B, D) with D = sum_i C_i H_i W_i."""
    b = z[0].shape[0]
    return torch.cat([e.reshape(b, -1) for e in z], dim=1)


def vec2list(v: torch.Tensor, shapes: Sequence[torch.Size]) -> StateList:
    """(B, D) -> [(B, C_i, H_i, W_i)] for the given per-resolution shapes."""
    out, start = [], 0
    for s in shapes:
        n = int(math.prod(s[1:]))
        out.append(v[:, start:start + n].reshape(v.shape[0], *s[1:]))
        start += n
    return out


def summarize(stats: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Batch summaries of a solver's stats, kept as device tensors (convert with .item() only when logging)."""
    return {
        "nstep": stats["nstep"].float().mean(),
        "abs_res": stats["abs_res"].float().mean(),
        "rel_res": stats["rel_res"].float().mean(),
        "diverged": stats["diverged"].sum(),
        "nfev": torch.tensor(float(stats["nfev"])),
    }


class DEQLayer(nn.Module):
    """Finds z* = f(z*) and differentiates through it without unrolling the solver.

    Args:
        f_solver, b_solver: solver names (see ``mdeq.modules.solvers.SOLVERS``).
        f_thres, b_thres: iteration caps of the forward and backward solves.
        stop_mode: "abs" or "rel".
        f_eps, b_eps: tolerances; None takes the original's (abs: 1e-5 sqrt(D) forward, 2e-10 sqrt(D)
            backward, per sample; rel: 1e-3 both).
        eval_f_thres: forward cap at evaluation (None: f_thres).
        rand_f_thres_delta: in training, the forward cap is drawn from f_thres +- delta.
        backward: "implicit" or "phantom".
        phantom_steps, phantom_tau: the phantom gradient's unrolled steps and damping.
        f_options, b_options: extra keyword options of the two solvers (e.g. {"memory": 8}).
        spectral_radius: estimate the spectral radius of J at z* in evaluation (analysis; slow).
        warm_start: in evaluation, start from the previous z* when its shape matches.
        check_every: solvers test "has every sample stopped?" (a host synchronisation) only every this many
            iterations; 0 picks 1 on the CPU and 4 on accelerators, where a synchronisation stalls the queue.
    """

    def __init__(self, f_solver: str = "broyden", b_solver: str = "broyden", f_thres: int = 30,
                 b_thres: int = 40, stop_mode: str = "abs", f_eps: Optional[float] = None,
                 b_eps: Optional[float] = None, eval_f_thres: Optional[int] = None, rand_f_thres_delta: int = 0,
                 backward: str = "implicit", phantom_steps: int = 5, phantom_tau: float = 0.5,
                 f_options: Optional[Dict[str, Any]] = None, b_options: Optional[Dict[str, Any]] = None,
                 spectral_radius: bool = False, warm_start: bool = False, check_every: int = 0) -> None:
        super().__init__()
        if backward not in ("implicit", "phantom"):
            raise ValueError(f"backward must be 'implicit' or 'phantom', got {backward!r}")
        self.f_solver_name, self.b_solver_name = f_solver, b_solver
        self.f_solver, self.b_solver = get_solver(f_solver), get_solver(b_solver)
        self.f_thres, self.b_thres = int(f_thres), int(b_thres)
        self.stop_mode = stop_mode
        self.f_eps, self.b_eps = f_eps, b_eps
        self.eval_f_thres = eval_f_thres
        self.rand_f_thres_delta = int(rand_f_thres_delta)
        self.backward_mode = backward
        self.phantom_steps, self.phantom_tau = int(phantom_steps), float(phantom_tau)
        self.f_options = dict(f_options or {})
        self.b_options = dict(b_options or {})
        self.spectral_radius = spectral_radius
        self.warm_start = warm_start
        self.check_every = int(check_every)
        self._hook: Optional[Any] = None
        self._last_z: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        return (f"f_solver={self.f_solver_name}, b_solver={self.b_solver_name}, f_thres={self.f_thres}, "
                f"b_thres={self.b_thres}, stop_mode={self.stop_mode}, backward={self.backward_mode}")

    # ------------------------------------------------------------------------------------------- tolerances
    def _tol(self, eps: Optional[float], dim: int, forward: bool) -> float:
        if eps is not None and eps > 0:
            return float(eps)
        if self.stop_mode == "rel":
            return 1e-3
        return (1e-5 if forward else 2e-10) * math.sqrt(dim)

    def _forward_cap(self) -> int:
        if not self.training:
            return int(self.eval_f_thres) if self.eval_f_thres else self.f_thres
        if self.rand_f_thres_delta > 0:
            return max(1, self.f_thres + random.randint(-self.rand_f_thres_delta, self.rand_f_thres_delta))
        return self.f_thres

    def _options(self, options: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
        out = dict(options)
        out.setdefault("check_every", self.check_every or (1 if device.type == "cpu" else 4))
        return out

    def remove_hook(self) -> None:
        """Removes a backward hook that never fired (its forward had no backward)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # ----------------------------------------------------------------------------------------- unrolled mode
    def unrolled(self, f: Callable[[StateList], StateList], z0: StateList, num_layers: int,
                 compute_jac_loss: bool = False) -> Tuple[StateList, Dict[str, Any]]:
        """Weight-tied unrolling: ``num_layers`` plain applications of f, differentiated by autograd."""
        self.remove_hook()
        info: Dict[str, Any] = {"mode": "unrolled", "jac_loss": None}
        z = z0
        for _ in range(num_layers - 1):
            z = f(z)
        if compute_jac_loss and torch.is_grad_enabled():
            shapes = [e.shape for e in z]
            zin = list2vec(z)
            if not zin.requires_grad:
                zin = zin.detach().requires_grad_()
            fz = list2vec(f(vec2list(zin, shapes)))
            info["jac_loss"] = jac_loss_estimate(fz, zin)
            return vec2list(fz, shapes), info
        return f(z), info

    # -------------------------------------------------------------------------------------- equilibrium mode
    def forward(self, f: Callable[[StateList], StateList], z0: StateList, compute_jac_loss: bool = False
                ) -> Tuple[StateList, Dict[str, Any]]:
        """Solves for the equilibrium of f starting from z0; returns (states, info)."""
        self.remove_hook()
        shapes = [e.shape for e in z0]

        def fvec(v: torch.Tensor) -> torch.Tensor:
            return list2vec(f(vec2list(v, shapes)))

        x0 = list2vec(z0)
        if not self.training and self.warm_start and self._last_z is not None and self._last_z.shape == x0.shape:
            x0 = self._last_z
        dim = x0.shape[1]
        with torch.no_grad():
            z_star, stats = self.f_solver(fvec, x0, self._forward_cap(), self._tol(self.f_eps, dim, True),
                                          self.stop_mode, **self._options(self.f_options, x0.device))
        info: Dict[str, Any] = {"mode": "equilibrium", "forward": summarize(stats), "jac_loss": None}
        if not self.training and self.warm_start:
            self._last_z = z_star.detach()

        if not (self.training and torch.is_grad_enabled()):
            if self.spectral_radius:
                with torch.enable_grad():
                    zr = z_star.detach().requires_grad_()
                    radius, _ = power_method(fvec(zr), zr, n_iters=100)
                info["spectral_radius"] = radius.mean()
            return vec2list(z_star, shapes), info

        z_star = z_star.detach().requires_grad_()
        if self.backward_mode == "phantom":
            z = z_star
            for _ in range(self.phantom_steps):
                z = self.phantom_tau * fvec(z) + (1.0 - self.phantom_tau) * z
            if compute_jac_loss:
                info["jac_loss"] = jac_loss_estimate(fvec(z_star), z_star)
            return vec2list(z, shapes), info

        f_z = fvec(z_star)
        if compute_jac_loss:
            info["jac_loss"] = jac_loss_estimate(f_z, z_star)
        if f_z.requires_grad:
            self._register_adjoint_hook(f_z, z_star, info)
        return vec2list(f_z, shapes), info

    def _register_adjoint_hook(self, f_z: torch.Tensor, z_star: torch.Tensor, info: Dict[str, Any]) -> None:
        b_solver, b_thres = self.b_solver, self.b_thres
        b_options = self._options(self.b_options, f_z.device)
        b_tol = self._tol(self.b_eps, f_z.shape[1], False)
        stop_mode = self.stop_mode
        layer = self

        def hook(grad: torch.Tensor) -> torch.Tensor:
            # Fire once: remove first, so the VJPs below (which backpropagate through f_z) cannot re-enter.
            if layer._hook is not None:
                layer._hook.remove()
                layer._hook = None

            def adjoint(g: torch.Tensor) -> torch.Tensor:
                # g -> J^T g + grad, whose fixed point solves (J^T - I) g = -grad
                vjp = torch.autograd.grad(f_z, z_star, g, retain_graph=True)[0]
                return vjp + grad

            with torch.no_grad():
                g, stats = b_solver(adjoint, grad.detach().clone(), b_thres, b_tol, stop_mode, **b_options)
            info["backward"] = summarize(stats)
            return g

        self._hook = f_z.register_hook(hook)
