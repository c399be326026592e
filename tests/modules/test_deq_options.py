"""The equilibrium layer's choices between the originals' computation and this project's, one by one."""
import random

import pytest
import torch

from mdeq.modules.deq import DEQLayer


def _linear_f(bsz=3, dim=6, seed=0):
    """A contraction f(z) = tanh(A z + b) on one (B, dim) state, as a per-resolution list of one tensor."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64) * 0.2
    b = torch.randn(bsz, dim, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(z):
        return [torch.tanh(z[0] @ a.T + b)]

    return f, a, b


def test_random_cap_second_generation_draws_only_on_jacobian_steps_from_minus_delta_to_plus_one():
    layer = DEQLayer(f_thres=10, rand_f_thres_delta=2, rand_f_thres_mode="jac_steps").train()
    random.seed(0)
    assert {layer._forward_cap(False) for _ in range(200)} == {10}
    assert {layer._forward_cap(True) for _ in range(400)} == {8, 9, 10, 11}
    layer = DEQLayer(f_thres=10, rand_f_thres_delta=2, rand_f_thres_mode="every_step").train()
    assert {layer._forward_cap(False) for _ in range(400)} == {8, 9, 10, 11, 12}
    assert {layer.eval()._forward_cap(True) for _ in range(50)} == {10}


def test_without_b_thres_the_backward_solve_runs_with_the_forward_cap(monkeypatch):
    caps = []
    layer = DEQLayer(f_solver="fixed_point", b_solver="fixed_point", f_thres=7, b_thres=None, f_eps=1e-30,
                     b_eps=1e-30, rand_f_thres_delta=3, rand_f_thres_mode="every_step").train()
    original = layer.b_solver

    def spy(f, x0, max_iter, *args, **kwargs):
        caps.append(max_iter)
        return original(f, x0, max_iter, *args, **kwargs)

    layer.b_solver = spy
    f, _, b = _linear_f()
    for seed in range(6):
        random.seed(seed)
        z, info = layer(f, [torch.zeros(3, 6, dtype=torch.float64)])
        z[0].sum().backward()
        assert caps[-1] == int(info["forward"]["nstep"]) == layer._cap  # the cap drawn for this step


@pytest.mark.parametrize("init,at", [("zeros", "f_z"), ("grad", "z"), ("zeros", "z"), ("grad", "f_z")])
def test_adjoint_start_and_jacobian_point(init, at):
    """One capped adjoint step from the chosen start, with J taken at the chosen point, by hand."""
    f, a, b = _linear_f()
    layer = DEQLayer(f_solver="broyden", b_solver="fixed_point", f_thres=4, b_thres=1, b_eps=1e-30,
                     stop_scope="sample", adjoint_init=init, adjoint_at=at).train()
    w = torch.randn(3, 6, dtype=torch.float64)
    z, _ = layer(f, [torch.zeros(3, 6, dtype=torch.float64)])
    (z[0] * w).sum().backward()
    got = b.grad.clone()
    # by hand: z* is the solver's output (what evaluation returns), the layer's output is f(z*), and J^T g at a
    # point p is the VJP of f at p
    with torch.no_grad():
        zs = layer.eval()(f, [torch.zeros(3, 6, dtype=torch.float64)])[0][0]
    assert torch.allclose(z[0], f([zs])[0])
    point = z[0].detach() if at == "f_z" else zs

    def vjp(g):
        p = point.clone().requires_grad_()
        return torch.autograd.grad(f([p])[0], p, g)[0]

    start = torch.zeros_like(w) if init == "zeros" else w.clone()
    g = vjp(start) + w  # one fixed-point step of g <- J^T g + w (b_thres = 1), the better of start and step
    res_start = (vjp(start) + w - start).norm(dim=1)
    res_step = (vjp(g) + w - g).norm(dim=1)
    g = torch.where((res_step < res_start)[:, None], g, start)
    bb = b.detach().clone().requires_grad_()
    want = torch.autograd.grad(torch.tanh(zs @ a.T + bb), bb, g)[0]
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-10)


def test_pretraining_jacobian_loss_at_a_detached_copy_costs_one_more_call_and_keeps_the_output():
    f, _, _ = _linear_f()
    calls = []

    def counted(z):
        calls.append(1)
        return f(z)

    z0 = [torch.zeros(3, 6, dtype=torch.float64)]
    for where, n_calls in (("detached", 5), ("last", 4)):
        calls.clear()
        layer = DEQLayer(pretrain_jac_at=where, jac_vecs=2).train()
        out, info = layer.unrolled(counted, z0, 4, compute_jac_loss=True)
        assert len(calls) == n_calls and info["jac_loss"] is not None
        plain, _ = layer.unrolled(f, z0, 4)
        assert torch.equal(out[0], plain[0])  # both return the fourth application
