"""The equilibrium layer: forward solve without autograd, implicit (or phantom) backward.

The per-resolution states are flattened to one (B, D) tensor per batch only at the solver boundary.

Implicit differentiation: with z* = f(z*), the gradient of a loss through z* is g^T df/dtheta where g solves the
adjoint system g = J^T g + dL/dz* (J = df/dz at z*). In training the layer makes one differentiable call
f_z = f(z*) and registers a hook on f_z that replaces the incoming gradient dL/dz* by g (solved with the backward
solver); autograd then carries g into the parameters. The hook removes itself when it fires, and a hook that never
fired (no backward) is removed at the next forward, so no hook outlives its graph.

Two choices of the adjoint solve differ between the originals and this project (see docs/faithfulness.md):
``adjoint_init`` starts it at zeros (both originals) or at the incoming gradient (this project: one fixed-point
step closer), and ``adjoint_at`` takes J at f(z*) (the first original, which re-evaluates f at its output
f(z*) for the backward pass: one extra call of f) or at z* (the second original and this project). With capped
solves that do not converge, both change the gradient.

Layout. States in channels_last memory format are flattened in (H, W, C) order, so that the views handed
back to f keep channels_last strides and no call of f converts between layouts (the solvers only use
per-sample norms, dot products and elementwise operations, which do not depend on the order).

Mixed precision. Under an enclosing ``torch.autocast`` only the calls of f run in the lower precision: the
solvers always work in the dtype of the states.

Instrumentation. ``DEQLayer.probe`` (None by default) receives ``begin(kind)`` / ``end(kind)`` around every
call of f (``"f"``), every vector-Jacobian product of the adjoint solve (``"vjp"``), the backward pass
through the differentiable call(s) of f at z* (``"f_backward"``) and the two solves (``"forward_solve"``,
``"backward_solve"``, which contain the calls of f and the VJPs); benchmarks use it to time those parts.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import torch
from torch import nn

from mdeq.modules.graphs import GraphedF, Recorder, Slot, recorder_for
from mdeq.modules.jacobian import jac_loss_estimate, power_method
from mdeq.modules.solvers import get_solver
from mdeq.modules.solvers.common import SCOPES

logger = logging.getLogger(__name__)

StateList = List[torch.Tensor]

#: How the random forward cap is drawn (``rand_f_thres_mode``).
RAND_F_THRES_MODES = ("every_step", "jac_steps")
#: Where the adjoint solve starts (``adjoint_init``) and where its Jacobian is taken (``adjoint_at``).
ADJOINT_INITS = ("zeros", "grad")
ADJOINT_POINTS = ("f_z", "z")
#: Where the unrolled mode takes the Jacobian loss (``pretrain_jac_at``).
PRETRAIN_JAC_POINTS = ("detached", "last")


def list2vec(z: Sequence[torch.Tensor], channels_last: bool = False) -> torch.Tensor:
    """[(B, C_i, H_i, W_i)] -> (B, D) with D = sum_i C_i H_i W_i.

    Args:
        z: Per-resolution states.
        channels_last: Flatten each state in (H, W, C) order (no copy before the concatenation when the
            states are channels_last); otherwise in (C, H, W) order.

    Returns:
        The concatenated states, shape (B, D).
    """
    b = z[0].shape[0]
    if channels_last:
        return torch.cat([e.permute(0, 2, 3, 1).reshape(b, -1) for e in z], dim=1)  # (B, H*W*C) pieces
    return torch.cat([e.reshape(b, -1) for e in z], dim=1)


def vec2list(v: torch.Tensor, shapes: Sequence[torch.Size], channels_last: bool = False) -> StateList:
    """(B, D) -> [(B, C_i, H_i, W_i)] for the given per-resolution shapes (views of v where possible).

    Args:
        v: Flattened states, shape (B, D).
        shapes: The per-resolution shapes (B, C_i, H_i, W_i).
        channels_last: v was flattened in (H, W, C) order (see :func:`list2vec`); the pieces are then
            returned with channels_last strides.

    Returns:
        The per-resolution states.
    """
    out, start = [], 0
    b = v.shape[0]
    for s in shapes:
        n = int(math.prod(s[1:]))
        piece = v[:, start:start + n]
        if channels_last:
            c, h, w = s[1:]
            out.append(piece.reshape(b, h, w, c).permute(0, 3, 1, 2))  # (B, C, H, W), NHWC strides
        else:
            out.append(piece.reshape(b, *s[1:]))
        start += n
    return out


def is_channels_last(z: Sequence[torch.Tensor]) -> bool:
    """Whether every 4-d state is channels_last and at least one is not also plain contiguous.

    (A state with one channel or a 1x1 image is both; its two flattening orders coincide.)
    """
    if not z or any(e.dim() != 4 or not e.is_contiguous(memory_format=torch.channels_last) for e in z):
        return False
    return any(not e.is_contiguous() for e in z)


class Probe(Protocol):
    """Receives the start and end of the timed parts of an equilibrium layer (see the module docstring)."""

    def begin(self, kind: str) -> None:
        """Called when a part of kind ``"f"``, ``"vjp"``, ``"f_backward"``, ``"forward_solve"`` or
        ``"backward_solve"`` starts."""

    def end(self, kind: str) -> None:
        """Called when it ends."""


def autocast_state(device_type: str) -> Tuple[bool, Optional[torch.dtype]]:
    """Whether autocast is enabled for ``device_type`` here, and its dtype (torch >= 2.1)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no argument
        enabled = (torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled())
    if not enabled:
        return False, None
    try:
        return True, torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        return True, (torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype())


@contextlib.contextmanager
def _probed(probe: Optional[Probe], kind: str) -> Iterator[None]:
    if probe is None:
        yield
        return
    probe.begin(kind)
    try:
        yield
    finally:
        probe.end(kind)


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
        f_thres, b_thres: iteration caps of the forward and backward solves; ``b_thres=None`` uses the forward
            cap of the same step (what the first original does: its backward solve ignores B_THRES).
        stop_mode: "abs" or "rel".
        f_eps, b_eps: tolerances; None takes the first original's (abs: 1e-5 sqrt(N) forward, 2e-10 sqrt(N)
            backward with N = D per sample, or N = B D over the batch with ``stop_scope="batch"``; rel: 1e-3).
        eval_f_thres: forward cap at evaluation (None: f_thres).
        rand_f_thres_delta: in training, the forward cap is drawn at random (see ``rand_f_thres_mode``).
        rand_f_thres_mode: "jac_steps" (the second original: only on steps that compute the Jacobian loss,
            uniformly from f_thres - delta .. f_thres + 1) or "every_step" (every training step, uniformly from
            f_thres - delta .. f_thres + delta).
        stop_scope: "batch" (both originals: one residual for the batch, which stops as a whole and returns its
            lowest-residual iterate) or "sample" (each sample stops on its own).
        stall: window of the originals' "no progress" stop in both solves (0: off; the originals use 30).
        keep_start: the starting point is a candidate for a solve's result (first original: True; second: False).
        adjoint_init: "zeros" (both originals) or "grad" (start the adjoint solve at the incoming gradient).
        adjoint_at: "f_z" (first original: J at f(z*), one extra call of f in the backward pass) or "z" (J at z*).
        jac_vecs: random probe vectors of the Jacobian-loss estimate (the second original uses 2).
        pretrain_jac_at: where the unrolled (pretraining) mode takes the Jacobian loss: "detached" (the second
            original: at a detached copy of the last unrolled state, one extra call of f whose output is used
            only for the loss) or "last" (at the last application of f, whose output is the layer's).
        backward: "implicit" or "phantom".
        phantom_steps, phantom_tau: the phantom gradient's unrolled steps and damping.
        f_options, b_options: extra keyword options of the two solvers (e.g. {"memory": 8}).
        spectral_radius: estimate the spectral radius of J at z* in evaluation (analysis; slow).
        warm_start: in evaluation, start from the previous z* when its shape matches.
        check_every: solvers test "has every sample stopped?" (a host synchronisation) only every this many
            iterations; 0 picks 1 on the CPU and 4 on accelerators, where a synchronisation stalls the queue.
        cuda_graph: on CUDA, the forward solve replays its calls of f from a CUDA graph captured once per shape
            (see ``mdeq.modules.graphs``); needs the caller to name f's per-batch tensors (``graph_slots`` of
            :meth:`forward`). Elsewhere f runs eagerly. ``graph_recorder`` (an attribute) replaces the CUDA
            recorder, e.g. by ``graphs.ReplayRecorder`` to exercise the same path on the CPU.
    """

    def __init__(self, f_solver: str = "broyden", b_solver: str = "broyden", f_thres: int = 30,
                 b_thres: Optional[int] = 40, stop_mode: str = "abs", f_eps: Optional[float] = None,
                 b_eps: Optional[float] = None, eval_f_thres: Optional[int] = None, rand_f_thres_delta: int = 0,
                 backward: str = "implicit", phantom_steps: int = 5, phantom_tau: float = 0.5,
                 f_options: Optional[Dict[str, Any]] = None, b_options: Optional[Dict[str, Any]] = None,
                 spectral_radius: bool = False, warm_start: bool = False, check_every: int = 0,
                 rand_f_thres_mode: str = "every_step", stop_scope: str = "sample", stall: int = 0,
                 keep_start: bool = True, adjoint_init: str = "grad", adjoint_at: str = "z", jac_vecs: int = 1,
                 pretrain_jac_at: str = "last", cuda_graph: bool = False) -> None:
        super().__init__()
        for name, value, valid in (("backward", backward, ("implicit", "phantom")),
                                   ("rand_f_thres_mode", rand_f_thres_mode, RAND_F_THRES_MODES),
                                   ("stop_scope", stop_scope, SCOPES),
                                   ("adjoint_init", adjoint_init, ADJOINT_INITS),
                                   ("adjoint_at", adjoint_at, ADJOINT_POINTS),
                                   ("pretrain_jac_at", pretrain_jac_at, PRETRAIN_JAC_POINTS)):
            if value not in valid:
                raise ValueError(f"{name} must be one of {list(valid)}, got {value!r}")
        self.f_solver_name, self.b_solver_name = f_solver, b_solver
        self.f_solver, self.b_solver = get_solver(f_solver), get_solver(b_solver)
        self.f_thres = int(f_thres)
        self.b_thres = None if b_thres is None else int(b_thres)
        self.rand_f_thres_mode = rand_f_thres_mode
        self.stop_scope, self.stall, self.keep_start = stop_scope, int(stall), bool(keep_start)
        self.adjoint_init, self.adjoint_at = adjoint_init, adjoint_at
        self.jac_vecs, self.pretrain_jac_at = int(jac_vecs), pretrain_jac_at
        self._cap = self.f_thres  # forward cap of the latest training step (the backward cap when b_thres is None)
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
        self.probe: Optional[Probe] = None
        self.cuda_graph = bool(cuda_graph)
        self.graph_recorder: Optional[Recorder] = None
        self._graphs: Optional[GraphedF] = None
        self._graph_note = False

    def __getstate__(self) -> Dict[str, Any]:
        """Copies and pickles leave captured graphs out (a copy captures its own)."""
        state = self.__dict__.copy()
        state["_graphs"] = None
        return state

    def extra_repr(self) -> str:
        return (f"f_solver={self.f_solver_name}, b_solver={self.b_solver_name}, f_thres={self.f_thres}, "
                f"b_thres={self.b_thres}, stop_mode={self.stop_mode}, stop_scope={self.stop_scope}, "
                f"backward={self.backward_mode}, adjoint_init={self.adjoint_init}, adjoint_at={self.adjoint_at}")

    # ------------------------------------------------------------------------------------------- tolerances
    def _tol(self, eps: Optional[float], shape: torch.Size, forward: bool) -> float:
        """The solve's tolerance for states of shape (B, D)."""
        if eps is not None and eps > 0:
            return float(eps)
        if self.stop_mode == "rel":
            return 1e-3
        n = shape[1] * (shape[0] if self.stop_scope == "batch" else 1)
        return (1e-5 if forward else 2e-10) * math.sqrt(n)

    def _forward_cap(self, compute_jac_loss: bool = False) -> int:
        if not self.training:
            return int(self.eval_f_thres) if self.eval_f_thres else self.f_thres
        delta = self.rand_f_thres_delta
        if delta > 0 and self.rand_f_thres_mode == "every_step":
            return max(1, self.f_thres + random.randint(-delta, delta))
        if delta > 0 and compute_jac_loss:  # "jac_steps"
            return max(1, self.f_thres + random.randint(-delta, 1))
        return self.f_thres

    def _options(self, options: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
        out = dict(options)
        out.setdefault("check_every", self.check_every or (1 if device.type == "cpu" else 4))
        out.setdefault("scope", self.stop_scope)
        out.setdefault("stall", self.stall)
        out.setdefault("keep_start", self.keep_start)
        return out

    def remove_hook(self) -> None:
        """Removes a backward hook that never fired (its forward had no backward)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _f(self, f: Callable[[StateList], StateList], z: StateList) -> StateList:
        """One call of f, reported to the probe."""
        with _probed(self.probe, "f"):
            return f(z)

    # ----------------------------------------------------------------------------------------- unrolled mode
    def unrolled(self, f: Callable[[StateList], StateList], z0: StateList, num_layers: int,
                 compute_jac_loss: bool = False) -> Tuple[StateList, Dict[str, Any]]:
        """Weight-tied unrolling: ``num_layers`` plain applications of f, differentiated by autograd.

        With ``compute_jac_loss`` the Jacobian loss is taken where ``pretrain_jac_at`` says: at a detached copy
        of the last state (one extra call of f, used only for the loss) or at the last application of f.
        """
        self.remove_hook()
        info: Dict[str, Any] = {"mode": "unrolled", "jac_loss": None}
        jac = compute_jac_loss and torch.is_grad_enabled()
        z = z0
        for _ in range(num_layers - (1 if jac and self.pretrain_jac_at == "last" else 0)):
            z = self._f(f, z)
        if not jac:
            return z, info
        shapes = [e.shape for e in z]
        nhwc = is_channels_last(z)
        zin = list2vec(z, nhwc)
        if self.pretrain_jac_at == "detached" or not zin.requires_grad:
            zin = zin.detach().requires_grad_()
        fz = list2vec(self._f(f, vec2list(zin, shapes, nhwc)), nhwc)
        info["jac_loss"] = jac_loss_estimate(fz, zin, vecs=self.jac_vecs)
        if self.pretrain_jac_at == "detached":
            return z, info
        return vec2list(fz, shapes, nhwc), info

    # -------------------------------------------------------------------------------------- equilibrium mode
    def _solve_f(self, fvec: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor,
                 graph_slots: Optional[Sequence[Slot]], graph_params: Sequence[torch.Tensor],
                 tag: Any) -> Any:
        """A context giving the f of the forward solve: graphed (``cuda_graph``) or fvec itself."""
        if not self.cuda_graph or graph_slots is None or self.probe is not None:
            return contextlib.nullcontext(fvec)
        recorder = self.graph_recorder or recorder_for(x0.device)
        if recorder is None:
            if not self._graph_note:
                self._graph_note = True
                logger.warning("DEQ.CUDA_GRAPH is set but the states are on %s, not CUDA: f runs eagerly",
                               x0.device)
            return contextlib.nullcontext(fvec)
        if self._graphs is None or self._graphs.recorder is not recorder:
            self._graphs = GraphedF(recorder)
        return self._graphs.bind(fvec, x0, graph_slots, graph_params, tag=tag)

    def forward(self, f: Callable[[StateList], StateList], z0: StateList, compute_jac_loss: bool = False,
                graph_slots: Optional[Sequence[Slot]] = None, graph_params: Sequence[torch.Tensor] = ()
                ) -> Tuple[StateList, Dict[str, Any]]:
        """Solves for the equilibrium of f starting from z0; returns (states, info).

        ``graph_slots`` / ``graph_params`` (only read with ``cuda_graph``): every tensor f reads that changes from
        one forward pass to the next, as ``(owner, key)`` slots, and the tensors f reads that change in place
        (its parameters and buffers); see ``mdeq.modules.graphs``.
        """
        self.remove_hook()
        shapes = [e.shape for e in z0]
        nhwc = is_channels_last(z0)
        device_type = z0[0].device.type
        amp, amp_dtype = autocast_state(device_type)
        probe = self.probe

        def fvec(v: torch.Tensor) -> torch.Tensor:
            # (B, D) -> (B, D) in the states' dtype; f itself runs under the caller's autocast, if any.
            with _probed(probe, "f"), torch.autocast(device_type, dtype=amp_dtype, enabled=amp):
                return list2vec(f(vec2list(v, shapes, nhwc)), nhwc).to(v.dtype)

        x0 = list2vec(z0, nhwc)
        if not self.training and self.warm_start and self._last_z is not None and self._last_z.shape == x0.shape:
            x0 = self._last_z
        self._cap = self._forward_cap(compute_jac_loss)
        with torch.no_grad(), torch.autocast(device_type, enabled=False), _probed(probe, "forward_solve"), \
                self._solve_f(fvec, x0, graph_slots, graph_params, (amp, amp_dtype)) as f_solve:
            z_star, stats = self.f_solver(f_solve, x0, self._cap, self._tol(self.f_eps, x0.shape, True),
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
            return vec2list(z_star, shapes, nhwc), info

        z_star = z_star.detach().requires_grad_()
        if self.backward_mode == "phantom":
            z = z_star
            for step in range(self.phantom_steps):
                fz = fvec(z)
                if step == 0 and compute_jac_loss:  # reuses f(z*) of the first step
                    info["jac_loss"] = jac_loss_estimate(fz, z_star, vecs=self.jac_vecs)
                z = self.phantom_tau * fz + (1.0 - self.phantom_tau) * z
            if compute_jac_loss and info["jac_loss"] is None:
                info["jac_loss"] = jac_loss_estimate(fvec(z_star), z_star, vecs=self.jac_vecs)
            if probe is not None and z.requires_grad:
                z.register_hook(self._probe_hook(probe, "begin"))
                z_star.register_hook(self._probe_hook(probe, "end"))
            return vec2list(z, shapes, nhwc), info

        f_z = fvec(z_star)
        if compute_jac_loss:
            info["jac_loss"] = jac_loss_estimate(f_z, z_star, vecs=self.jac_vecs)
        if f_z.requires_grad:
            self._register_adjoint_hook(f_z, z_star, info, fvec)
        return vec2list(f_z, shapes, nhwc), info

    @staticmethod
    def _probe_hook(probe: Probe, what: str) -> Callable[[torch.Tensor], None]:
        """A tensor hook that reports the start (``"begin"``) or end of the backward pass through f."""
        state = {"done": False}

        def hook(grad: torch.Tensor) -> None:
            if not state["done"]:
                state["done"] = True
                getattr(probe, what)("f_backward")

        return hook

    def _register_adjoint_hook(self, f_z: torch.Tensor, z_star: torch.Tensor, info: Dict[str, Any],
                               fvec: Callable[[torch.Tensor], torch.Tensor]) -> None:
        b_solver = self.b_solver
        b_thres = self.b_thres if self.b_thres is not None else self._cap
        b_options = self._options(self.b_options, f_z.device)
        b_tol = self._tol(self.b_eps, f_z.shape, False)
        stop_mode = self.stop_mode
        adjoint_init, adjoint_at = self.adjoint_init, self.adjoint_at
        layer = self
        probe = self.probe
        if probe is not None:
            # The adjoint VJPs also reach z_star; only the gradient after the hook ends the backward pass.
            started = {"flag": False}

            def end_hook(grad: torch.Tensor) -> None:
                if started["flag"]:
                    started["flag"] = False
                    probe.end("f_backward")

            z_star.register_hook(end_hook)

        def hook(grad: torch.Tensor) -> torch.Tensor:
            # Fire once: remove first, so the VJPs below (which backpropagate through f_z) cannot re-enter.
            if layer._hook is not None:
                layer._hook.remove()
                layer._hook = None

            if adjoint_at == "f_z":
                # J at f(z*): one more call of f, at a detached copy of its output (only its VJPs are used)
                with torch.enable_grad():
                    jac_in = f_z.detach().requires_grad_()
                    jac_out = fvec(jac_in)
            else:
                jac_in, jac_out = z_star, f_z

            def adjoint(g: torch.Tensor) -> torch.Tensor:
                # g -> J^T g + grad, whose fixed point solves (J^T - I) g = -grad
                with _probed(probe, "vjp"):
                    vjp = torch.autograd.grad(jac_out, jac_in, g, retain_graph=True)[0]
                    return vjp + grad

            start = torch.zeros_like(grad) if adjoint_init == "zeros" else grad.detach().clone()
            with torch.no_grad(), torch.autocast(grad.device.type, enabled=False), _probed(probe, "backward_solve"):
                g, stats = b_solver(adjoint, start, b_thres, b_tol, stop_mode, **b_options)
            del jac_in, jac_out
            info["backward"] = summarize(stats)
            if probe is not None:
                started["flag"] = True
                probe.begin("f_backward")
            return g

        self._hook = f_z.register_hook(hook)
