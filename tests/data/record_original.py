"""Records what the two original implementations compute, as facts for this project's tests.

Usage (from the repository root; the argument is a folder holding both originals, ``mdeq/`` = locuslab/mdeq and
``deq/`` = locuslab/deq with its ``MDEQ-Vision/``)::

    python tests/data/record_original.py /path/to/reference

It writes, next to this file:

* ``original_oracle_mdeq.pt`` / ``.json``: a small MDEQ built by the first original from its
  ``experiments/cifar/cls_mdeq_TINY.yaml`` (shipped caps F_THRES 22 / B_THRES 24, tiny widths, no dropout),
  its weights before the step, one fixed batch, and the training loss and the gradient of every parameter
  in equilibrium mode (forward Broyden, implicit backward);
* ``original_oracle_vision.pt`` / ``.json``: the same for the second generation (MDEQ-Vision) built from its
  ``experiments/cifar/cls_mdeq_LARGE_reg.yaml`` and ``experiments/imagenet/cls_mdeq_SMALL_reg.yaml``, in
  equilibrium mode with the Jacobian loss, and in the unrolled pretraining mode with the Jacobian loss;
* ``original_oracle_solvers.pt``: the results of both originals' Broyden solvers on a small batch of fixed-point
  problems (batch-wide stopping, the 27-slot circular memory of the first original past 27 iterations, the
  second generation's tolerances and best-iterate rule).

Everything runs on the CPU in float64 (the originals create their solver buffers in the default dtype, so the
default dtype is switched), so that the comparison is not limited by float32 rounding. Each original runs in a
child process of its own, because both use the same module names. The recorded files do not depend on this
project's code.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))

# Tiny widths replacing the yamls' (everything else comes from the shipped yaml).
TINY_STAGE = {"NUM_CHANNELS": [8, 16], "HEAD_CHANNELS": [4, 8], "FINAL_CHANSIZE": 16}
TINY_STAGE4 = {"NUM_CHANNELS": [8, 8, 8, 8], "HEAD_CHANNELS": [4, 4, 4, 4], "FINAL_CHANSIZE": 16,
               "NUM_BLOCKS": [1, 1, 1, 1]}
BATCH, IMAGE = 4, 8
DIM = 64  # dimension of the solver problems
IMAGE4 = 16  # four branches: the lowest resolution keeps at least 2 x 2 pixels (GroupNorm of one value is degenerate)


def _stub_missing_modules() -> None:
    """The originals import termcolor for coloured warnings; a stand-in is enough when it is missing."""
    try:
        import termcolor  # noqa: F401
    except ImportError:
        stub = types.ModuleType("termcolor")
        stub.colored = lambda text, *args, **kwargs: text
        sys.modules["termcolor"] = stub


def _prepare(paths: List[str]) -> None:
    import numpy as np
    import torch

    np.int = int  # removed from numpy; the originals still use it
    torch.cuda.synchronize = lambda *args, **kwargs: None  # called unconditionally in a backward hook
    torch.set_default_dtype(torch.float64)
    _stub_missing_modules()
    for p in reversed(paths):
        sys.path.insert(0, p)


def _batch(size: int = IMAGE):
    import torch

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, size, size, generator=gen).float().double()  # float32 values, stored exactly
    y = torch.arange(BATCH) % 10
    return x, y


def _shrink(config: Any, stage: Dict[str, Any], size: int = IMAGE) -> None:
    config.defrost()
    for key, value in stage.items():
        config.MODEL.EXTRA.FULL_STAGE[key] = value
    config.MODEL.DROPOUT = 0.0  # random masks cannot be matched across implementations
    config.MODEL.IMAGE_SIZE = [size, size]
    config.MODEL.NUM_CLASSES = 10
    config.freeze()


def _settle(model: Any) -> None:
    """Fixes the weights at a point where the capped solves make progress, as on a trained net.

    At the original's initialisation the adjoint solve of this tiny net never beats its zero start over the batch
    (so the first original returns a zero gradient for the stem and f). Damping the first convolution of every
    block (x 1e-4, below GroupNorm's epsilon) and the affine post-fusion norms (x 0.2) makes f contract enough for
    the 22-step adjoint solve to halve its residual. Every value is then rounded to float32, so that the stored
    float32 weights are exactly the ones used.
    """
    import torch

    with torch.no_grad():
        for branch in model.fullstage.branches:
            for block in branch.blocks:
                conv = block.conv1
                (conv.weight_g if hasattr(conv, "weight_g") else conv.weight).mul_(1e-4)
        for layer in model.fullstage.post_fuse_layers:
            if getattr(layer.gnorm, "weight", None) is not None:
                layer.gnorm.weight.mul_(0.2)
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.float().double())


def _spy_solver(name: str, log: List[Dict[str, Any]]) -> None:
    """Wraps the loaded original's solver ``name`` wherever it was imported, logging each solve's outcome."""
    for module in list(sys.modules.values()):
        solver = getattr(module, name, None)
        if not callable(solver) or getattr(solver, "__module__", "") not in ("broyden", "modules.broyden",
                                                                            "lib.solvers"):
            continue

        def wrapped(*args, _solver=solver, **kwargs):
            res = _solver(*args, **kwargs)
            trace = res.get("trace", res.get("abs_trace"))
            log.append({"name": kwargs.get("name"), "nstep": int(res["nstep"]),
                        "lowest_step": int(res.get("lowest_step", res["nstep"])),
                        "trace": [float(t) for t in trace]})
            return res

        setattr(module, name, wrapped)


def _state(model: Any) -> Dict[str, Any]:
    """The state dict without the first original's duplicate copies of f, in float32 (exact, see _settle)."""
    dups = ("fullstage_copy.", "deq.func.", "deq.func_copy.")
    return {k: (v.float() if v.is_floating_point() else v).clone() for k, v in model.state_dict().items()
            if not k.startswith(dups)}


def _grads(model: Any) -> Dict[str, Any]:
    """Every parameter's gradient (float32 is plenty for a 1e-4 comparison); parameters without one get zeros."""
    import torch

    return {name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().clone()
            for name, p in model.named_parameters() if p.requires_grad}


def _summary(case: Dict[str, Any]) -> Dict[str, Any]:
    return {"loss": float(case["loss"]), "total": float(case["total"]), "solves": case.get("solves"),
            "grad_norms": {k: float(v.norm()) for k, v in case["grads"].items()}}


def record_mdeq(ref: str) -> None:
    """The first original: loss and gradients in equilibrium mode at the shipped caps."""
    root = os.path.join(ref, "mdeq")
    _prepare([os.path.join(root, "lib"), os.path.join(root, "lib", "models"), os.path.join(root, "lib", "modules")])
    import torch
    from config import config  # the original's module-level config
    import models.mdeq as original

    yaml = os.path.join(root, "experiments", "cifar", "cls_mdeq_TINY.yaml")
    config.defrost()
    config.merge_from_file(yaml)
    config.TRAIN.PRETRAIN_STEPS = 10
    _shrink(config, TINY_STAGE)
    torch.manual_seed(0)
    model = original.get_cls_net(config).train()
    x, y = _batch()
    _settle(model)
    state = _state(model)
    model.zero_grad()
    solves: List[Dict[str, Any]] = []
    _spy_solver("broyden", solves)
    out = model(x, train_step=config.TRAIN.PRETRAIN_STEPS)
    loss = torch.nn.functional.cross_entropy(out, y)
    loss.backward()
    case = {"loss": loss.detach(), "total": loss.detach(), "grads": _grads(model), "solves": solves}
    data = {"yaml": "experiments/cifar/cls_mdeq_TINY.yaml", "stage": TINY_STAGE, "pretrain_steps": 10,
            "train_step": config.TRAIN.PRETRAIN_STEPS, "state_dict": state, "x": x.float(), "y": y,
            "cases": {"equilibrium": case}}
    torch.save(data, os.path.join(HERE, "original_oracle_mdeq.pt"))
    with open(os.path.join(HERE, "original_oracle_mdeq.json"), "w") as fh:
        json.dump({"yaml": data["yaml"], "cases": {"equilibrium": _summary(case)}}, fh, indent=1, sort_keys=True)


def record_vision(ref: str) -> None:
    """The second generation: loss + Jacobian loss and gradients, equilibrium and pretraining modes."""
    root = os.path.join(ref, "deq", "MDEQ-Vision")
    _prepare([os.path.join(ref, "deq"), os.path.join(root, "lib"), os.path.join(root, "lib", "models")])
    import torch
    from config import config as defaults
    import models.mdeq as original
    from lib import optimizations

    def ones_when_no_dropout(self, bsz, d, H, W, _reset=optimizations.VariationalHidDropout2d.reset_mask):
        # Same mask as the original's (bernoulli(1) is all ones) without drawing from the random generator, so
        # that the Jacobian loss's probe vectors are the first numbers drawn after the seed (as in this project).
        if self.dropout == 0.0:
            self.mask = torch.ones(bsz, d, 1, 1) if self.spatial else torch.ones(bsz, d, H, W)
            return self.mask
        return _reset(self, bsz, d, H, W)

    optimizations.VariationalHidDropout2d.reset_mask = ones_when_no_dropout
    solves: List[Dict[str, Any]] = []
    _spy_solver("broyden", solves)

    out: Dict[str, Any] = {}
    for name, rel, stage, size in (
            ("cifar_LARGE_reg", "experiments/cifar/cls_mdeq_LARGE_reg.yaml", TINY_STAGE4, IMAGE4),
            ("imagenet_SMALL_reg", "experiments/imagenet/cls_mdeq_SMALL_reg.yaml", TINY_STAGE4, IMAGE4 * 4)):
        config = defaults.clone()
        config.defrost()
        config.merge_from_file(os.path.join(root, rel))
        config.TRAIN.PRETRAIN_STEPS = 10
        _shrink(config, stage, size)
        torch.manual_seed(0)
        model = original.get_cls_net(config).train()
        x, y = _batch(size)
        _settle(model)
        state = _state(model)
        cases = {}
        for mode, step, weight in (("equilibrium", 10, config.LOSS.JAC_LOSS_WEIGHT), ("pretrain", 0, 0.5)):
            model.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
            model.zero_grad()
            solves.clear()
            torch.manual_seed(2)  # the Jacobian loss's probe vectors
            logits, jac_loss, _ = model(x, train_step=step, compute_jac_loss=True, f_thres=config.DEQ.F_THRES,
                                        b_thres=config.DEQ.B_THRES)
            loss = torch.nn.functional.cross_entropy(logits, y)
            total = loss + weight * jac_loss.mean()
            total.backward()
            cases[mode] = {"loss": loss.detach(), "total": total.detach(), "jac_weight": float(weight),
                           "train_step": step, "grads": _grads(model), "solves": list(solves)}
        out[name] = {"yaml": rel, "stage": stage, "image": size, "pretrain_steps": 10, "state_dict": state,
                     "x": x.float(), "y": y,
                     "cases": cases}
    torch.save(out, os.path.join(HERE, "original_oracle_vision.pt"))
    with open(os.path.join(HERE, "original_oracle_vision.json"), "w") as fh:
        json.dump({k: {"yaml": v["yaml"], "cases": {m: _summary(c) for m, c in v["cases"].items()}}
                   for k, v in out.items()}, fh, indent=1, sort_keys=True)


def _problem():
    """A batch of 3 fixed-point problems z = tanh(A z + b) of dimension 64, hard enough that Broyden needs more
    than 27 steps (so the first original's circular memory matters)."""
    import torch

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(3, DIM, DIM, generator=gen) * 0.2
    b = torch.randn(3, DIM, generator=gen)
    return a, b


def record_solvers(ref: str) -> None:
    """Both originals' Broyden on the problems of :func:`_problem`, (B, D, 1) layout as they use it."""
    import torch

    _prepare([])
    _stub_missing_modules()
    sys.path.insert(0, os.path.join(ref, "mdeq", "lib", "modules"))
    import broyden as first  # noqa: E402
    sys.path.pop(0)
    sys.path.insert(0, os.path.join(ref, "deq", "lib"))
    import solvers as second  # noqa: E402

    a, b = _problem()

    def f(z):  # (B, D, 1) -> (B, D, 1)
        return torch.tanh(torch.bmm(a, z) + b[:, :, None])

    x0 = torch.zeros(3, DIM, 1)
    cases = {}
    for name, threshold, eps in (("first_batch_tol", 30, 1e-3), ("first_circular", 40, 1e-30)):
        res = first.broyden(lambda z: f(z) - z, x0, threshold=threshold, eps=eps)
        cases[name] = {"solver": "first", "threshold": threshold, "eps": eps, "result": res["result"][..., 0],
                       "nstep": res["nstep"], "lowest_step": res["lowest_step"], "trace": res["trace"]}
    for mode in ("abs", "rel"):
        for threshold in (6, 25):
            res = second.broyden(f, x0, threshold=threshold, stop_mode=mode)  # its default eps, 1e-3
            cases[f"second_{mode}_{threshold}"] = {"solver": "second", "threshold": threshold, "eps": 1e-3,
                                                   "stop_mode": mode, "result": res["result"][..., 0],
                                                   "lowest_step": res["nstep"],
                                                   "trace": res[f"{mode}_trace"]}
    torch.save({"a": a, "b": b, "cases": cases}, os.path.join(HERE, "original_oracle_solvers.pt"))


def main(argv: List[str]) -> int:
    if len(argv) < 2 or not os.path.isdir(os.path.join(argv[1], "mdeq")):
        print("usage: python tests/data/record_original.py /path/to/reference  (a folder holding mdeq/ and deq/)")
        return 2
    ref = os.path.abspath(argv[1])
    if len(argv) == 3:  # a child: one original per process
        {"mdeq": record_mdeq, "vision": record_vision, "solvers": record_solvers}[argv[2]](ref)
        return 0
    for which in ("solvers", "mdeq", "vision"):
        subprocess.run([sys.executable, os.path.abspath(__file__), ref, which], check=True, cwd=HERE)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
